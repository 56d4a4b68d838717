"""Evaluation tasks: sampled by the episode sampler, sliced, fingerprinted, saved and loaded, so one
seed gives the same tasks to every model and two runs can be compared task by task.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.data.episodes import UNKNOWN, EpisodeSampler, TaskBatch

if TYPE_CHECKING:
    from pipeline.features.readers import SplitReader


EPISODES_FORMAT = "strm-episodes/1"


# ----------------------------------------------------------------------------------------------
# Tasks: sampled by pipeline.episodes, sliced, fingerprinted, saved and loaded.


def sample_tasks(
    labels: np.ndarray | torch.Tensor,
    *,
    episodes: int,
    way: int,
    shot: int,
    queries: int,
    seed: int,
    unknown_classes: int = 0,
    unknown_queries: int = 0,
) -> TaskBatch:
    """The first `episodes` tasks of the seed's stream, all on view 0 (the test view); with unknown_classes
    M > 0, each also holds `unknown_queries` videos of M other actions (the open-set protocol)."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1 (got {episodes})")
    labels = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    sampler = EpisodeSampler(
        labels,
        way=way,
        shot=shot,
        queries=queries,
        seed=seed,
        unknown_classes=unknown_classes,
        unknown_queries=unknown_queries,
    )
    return sampler.batch(0, episodes)


def slice_tasks(tasks: TaskBatch, index: slice | np.ndarray) -> TaskBatch:
    """Some of the tasks of a batch, still a TaskBatch."""
    return TaskBatch(**{name: getattr(tasks, name)[index] for name in TaskBatch.__dataclass_fields__})


def task_settings(tasks: TaskBatch) -> dict[str, int]:
    """way, shot, queries and episodes (and, for open-set tasks only, unknown_classes and unknown_queries),
    read off the arrays so they cannot disagree with them."""
    way = tasks.classes.shape[1]
    settings = {
        "way": way,
        "shot": tasks.support.shape[1] // way,
        "queries": tasks.query.shape[1] // way,
        "episodes": len(tasks),
    }
    m = unknown_count(tasks)
    if m:  # closed-set settings (and so their digests) stay as they were
        settings.update(unknown_classes=m, unknown_queries=np.asarray(tasks.unknown_query).shape[1] // m)
    return settings


def unknown_count(tasks: TaskBatch) -> int:
    """M, the unseen actions each task's unknown queries come from (0: closed set)."""
    return int(np.asarray(tasks.unknown_classes).shape[1])


def episodes_digest(tasks: TaskBatch, video_ids: Sequence[str]) -> str:
    """sha256 of every task's support and query video ids in order: equal digests mean identical tasks.

    Ids rather than indices, so two caches that hold the same videos in the same split (another
    backbone, say) compare as equal, and two that differ by one failed video do not.
    """
    ids = np.asarray(video_ids, dtype=object)
    h = hashlib.sha256()
    h.update(json.dumps(task_settings(tasks)).encode())
    unknown = np.asarray(tasks.unknown_query)
    for b, (row_s, row_q) in enumerate(zip(tasks.support, tasks.query, strict=False)):
        text = "\x1f".join(ids[row_s]) + "\x1e" + "\x1f".join(ids[row_q])
        if unknown.shape[1]:  # open-set tasks only: a closed-set digest is unchanged
            text += "\x1c" + "\x1f".join(ids[unknown[b]])
        h.update((text + "\x1d").encode())
    return h.hexdigest()[:16]


def save_episodes(path: Path | str, tasks: TaskBatch, split: SplitReader, *, seed: int, split_name: str) -> Path:
    """Write the tasks as class names and video ids (JSON), so any tool can rerun exactly those; open-set
    tasks also name their unseen actions and unknown query videos."""
    path = Path(path)
    ids = np.asarray(split.video_ids, dtype=object)
    names = np.asarray(split.class_names, dtype=object)
    s = task_settings(tasks)
    way, shot, queries = s["way"], s["shot"], s["queries"]
    m = unknown_count(tasks)

    def task(b: int) -> dict[str, Any]:
        out = {
            "classes": names[tasks.classes[b]].tolist(),
            "support": ids[tasks.support[b]].reshape(way, shot).tolist(),
            "query": ids[tasks.query[b]].reshape(way, queries).tolist(),
        }
        if m:
            out["unknown_classes"] = names[np.asarray(tasks.unknown_classes)[b]].tolist()
            out["unknown_query"] = ids[np.asarray(tasks.unknown_query)[b]].reshape(m, s["unknown_queries"]).tolist()
        return out

    payload = {
        "format": EPISODES_FORMAT,
        "split": split_name,
        **s,
        "seed": seed,
        "digest": episodes_digest(tasks, split.video_ids),
        "tasks": [task(b) for b in range(len(tasks))],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, separators=(",", ":")) + "\n")
    return path


def load_episodes(path: Path | str, split: SplitReader) -> tuple[TaskBatch, dict[str, Any]]:
    """Read tasks written by `save_episodes` back as indices into `split`; returns (tasks, settings).

    Raises ValueError naming the file when a video or class is not in the split, or a video is
    not of the class the file says.
    """
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable episodes file ({err})") from err
    if payload.get("format") != EPISODES_FORMAT:
        raise ValueError(
            f"{path}: not an episodes file (format {payload.get('format')!r}, expected {EPISODES_FORMAT!r})"
        )
    way, shot, queries = payload["way"], payload["shot"], payload["queries"]
    video_index = {v: i for i, v in enumerate(split.video_ids)}
    class_index = {c: i for i, c in enumerate(split.class_names)}
    labels = split.labels.numpy()

    def lookup(table: dict[str, int], key: str, what: str) -> int:
        if key not in table:
            raise ValueError(f"{path}: {what} {key!r} is not in this split")
        return table[key]

    m, unknown_queries = payload.get("unknown_classes", 0), payload.get("unknown_queries", 0)
    classes, support, query, outsiders, unknown = [], [], [], [], []
    for t, task in enumerate(payload["tasks"]):
        c = [lookup(class_index, name, "class") for name in task["classes"]]
        s = [[lookup(video_index, v, "video") for v in row] for row in task["support"]]
        q = [[lookup(video_index, v, "video") for v in row] for row in task["query"]]
        o = [lookup(class_index, name, "class") for name in task.get("unknown_classes", [])]
        u = [[lookup(video_index, v, "video") for v in row] for row in task.get("unknown_query", [])]
        if len(c) != way or any(len(r) != shot for r in s) or any(len(r) != queries for r in q):
            raise ValueError(f"{path}: task {t} is not {way}-way {shot}-shot with {queries} queries")
        if len(o) != m or len(u) != m or any(len(r) != unknown_queries for r in u) or set(o) & set(c):
            raise ValueError(f"{path}: task {t} does not hold {unknown_queries} videos of each of {m} other classes")
        videos_of = [(name, s[i] + q[i]) for i, name in enumerate(task["classes"])]
        videos_of += list(zip(task.get("unknown_classes", []), u, strict=True))  # counts checked above
        for name, videos in videos_of:
            if (labels[np.asarray(videos, dtype=np.int64)] != class_index[name]).any():
                raise ValueError(f"{path}: task {t} holds a video that is not of class {name!r}")
        classes.append(c)
        support.append(np.ravel(s))
        query.append(np.ravel(q))
        outsiders.append(o)
        unknown.append(np.ravel(u))
    n = len(classes)
    if n == 0:
        raise ValueError(f"{path}: holds no tasks")
    tasks = TaskBatch(
        classes=np.asarray(classes, dtype=np.int64),
        support=np.asarray(support, dtype=np.int64),
        support_labels=np.tile(np.repeat(np.arange(way), shot), (n, 1)),
        support_views=np.zeros((n, way * shot), dtype=np.int64),
        query=np.asarray(query, dtype=np.int64),
        query_labels=np.tile(np.repeat(np.arange(way), queries), (n, 1)),
        query_views=np.zeros((n, way * queries), dtype=np.int64),
        unknown_classes=np.asarray(outsiders, dtype=np.int64).reshape(n, m),
        unknown_query=np.asarray(unknown, dtype=np.int64).reshape(n, m * unknown_queries),
        unknown_query_labels=np.full((n, m * unknown_queries), UNKNOWN, dtype=np.int64),
        unknown_query_views=np.zeros((n, m * unknown_queries), dtype=np.int64),
    )
    settings = {"split": payload.get("split"), "seed": payload.get("seed"), **task_settings(tasks)}
    return tasks, settings
