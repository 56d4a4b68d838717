"""What a manifest is checked for before anything is extracted: class folders the split definition does
not name, empty splits, and classes with too few usable videos for the tasks drawn from them. Each
finding is one warning that says how many and what to do; none stops the manifest from being written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.data.manifests import read_class_splits, unlisted_folders
from pipeline.data.protocol import SPLITS

_FIX_EMPTY = {
    "train": "train-heads learns from it: give some classes split train",
    "val": "train-heads validates on it: give some classes split val, or train with --val-every 0",
    "test": "evaluate draws its tasks from it: give some classes split test",
}


@dataclass(frozen=True)
class TaskSize:
    """The tasks drawn from a split: C classes, each with `shot` support and `queries` query videos."""

    way: int
    shot: int
    queries: int

    @property
    def videos(self) -> int:
        return self.shot + self.queries


def _listing(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (f", ... ({len(names) - most} more)" if len(names) > most else "")


# The option that asks a smaller way of each split's tasks.
_SMALLER_WAY = {
    "train": "train with a smaller --way",
    "val": "validate with a smaller --val-way (train-heads, finetune)",
    "test": "evaluate with a smaller --way",
}


def split_warnings(table: pd.DataFrame, tasks: dict[str, TaskSize]) -> list[str]:
    """Per split: no usable video; classes below a task's videos a class; fewer such classes than its way."""
    warnings = []
    ok = table[table["status"] == "ok"]
    for split in SPLITS:
        counts = ok[ok["split"] == split]["class"].value_counts()
        classes = table[table["split"] == split]["class"].unique()
        if counts.sum() == 0:
            warnings.append(f"split {split}: no usable videos ({len(classes)} classes listed); {_FIX_EMPTY[split]}")
            continue
        task = tasks[split]
        few = sorted((c for c in classes if counts.get(c, 0) < task.videos), key=lambda c: (counts.get(c, 0), c))
        if few:
            warnings.append(
                f"split {split}: {len(few)} of {len(classes)} classes have fewer than {task.videos} usable videos, the "
                f"fewest a default task takes from a class ({task.shot} shot + {task.queries} queries), so they "
                f"never enter one ({_listing([f'{c}: {counts.get(c, 0)}' for c in few])}); add videos, or "
                "train and evaluate with a smaller --shot or --queries"
            )
        if len(classes) - len(few) < task.way:
            warnings.append(
                f"split {split}: {len(classes) - len(few)} classes can enter a {task.way}-way task, which needs "
                f"{task.way}; add classes to the split, or {_SMALLER_WAY[split]}"
            )
    return warnings


def folder_warnings(videos: Path, classes_csv: Path) -> list[str]:
    """Class folders under `videos` that `classes_csv` does not name: their videos are left out."""
    unlisted = unlisted_folders(videos, read_class_splits(classes_csv))
    if not unlisted:
        return []
    return [
        f"{len(unlisted)} class folders under {videos} are not in {classes_csv}, so their videos are in no split "
        f"({_listing(unlisted)}); add each to the CSV with its split (a line class,split), or move it out"
    ]
