"""What a predict run leaves on disk: each windowed recording's timeline PNG (under a name no file holds
yet, so a second run keeps the first's), the JSON report, the CSV and the annotated videos."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.predict.annotate import annotate_records
from pipeline.predict.outputs import timeline_figure, unused_path, windowed, write_csv


def save_outputs(
    records: list[dict],
    actions: Sequence[str],
    report: Callable[[list[dict]], dict],
    *,
    figures: Path,
    json_out: Path | None = None,
    csv_out: Path | None = None,
    annotate: Path | None = None,
    top_k: int = 3,
) -> list[str]:
    """Write what was asked (timelines always, for windowed records, each record then naming its PNG);
    the lines that say where each file went. OSError names a file that could not be written."""
    said = []
    for r in records:
        if windowed(r):  # a free name: a second run, or a recording of one name in two folders, keeps its own
            figure = unused_path(figures, f"{Path(r['path']).stem}_timeline", ".png")
            r["timeline"] = str(timeline_figure(r, list(actions), figure))
            said.append(f"timeline: {r['timeline']}")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report(records), indent=1) + "\n")
    if csv_out is not None:
        write_csv(csv_out, records)
    for video in annotate_records(records, actions, annotate, top_k=top_k) if annotate else []:
        said.append(f"annotated: {video}")
    return said
