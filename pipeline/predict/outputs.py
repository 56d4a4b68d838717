"""What a person reads from predictions: windows merged into segments, the CSV, a recording's timeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def merge_segments(windows: list[dict]) -> list[dict]:
    """Adjacent windows of one prediction merged into segments that do not overlap: each window owns the
    time from halfway to the previous window's centre to halfway to the next's (the first from its start,
    the last to its end); [{start, end, prediction, probability (the windows' mean)}]."""
    centres = [(w["start"] + w["end"]) / 2 for w in windows]
    segments: list[dict] = []
    for i, w in enumerate(windows):
        lo = w["start"] if i == 0 else (centres[i - 1] + centres[i]) / 2
        hi = w["end"] if i == len(windows) - 1 else (centres[i] + centres[i + 1]) / 2
        if w.get("prediction") is None:
            continue
        last = segments[-1] if segments else None
        if last is not None and last["prediction"] == w["prediction"] and last["end"] == lo:
            last["end"], last["_p"] = hi, last["_p"] + [w["probability"]]
        else:
            segments.append({"start": lo, "end": hi, "prediction": w["prediction"], "_p": [w["probability"]]})
    return [
        {
            "start": round(s["start"], 3),
            "end": round(s["end"], 3),
            "prediction": s["prediction"],
            "probability": float(np.mean(s.pop("_p"))),
        }
        for s in segments
    ]


def write_csv(path: Path, records: list[dict]) -> Path:
    """One row per query: path, status, reason, prediction, probability, runner-up and its probability."""
    import pandas as pd

    rows = []
    for r in records:
        second = r["top_k"][1] if len(r.get("top_k", [])) > 1 else [None, None]
        rows.append(
            {
                "path": r["path"],
                "status": r["status"],
                "reason": r["reason"],
                "prediction": r["prediction"],
                "probability": r["probability"],
                "runner_up": second[0],
                "runner_up_probability": second[1],
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def timeline_figure(record: dict, actions: list[str], path: Path) -> Path:
    """Time on x, one probability curve per action over the windows, the merged segments shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = [w for w in record["windows"] if w["prediction"] is not None]
    fig, ax = plt.subplots(figsize=(10, 3.2), dpi=110)
    colours = {a: plt.cm.tab10(i % 10) for i, a in enumerate(actions)}
    mids = [(w["start"] + w["end"]) / 2 for w in windows]
    for action in actions:
        ax.plot(mids, [w["probabilities"].get(action, 0.0) for w in windows], label=action, color=colours[action])
    for s in record["segments"]:
        ax.axvspan(s["start"], s["end"], color=colours.get(s["prediction"], (0.5, 0.5, 0.5, 1)), alpha=0.12, lw=0)
        ax.text((s["start"] + s["end"]) / 2, 1.02, s["prediction"], ha="center", va="bottom", fontsize=6, rotation=12)
    ax.set(xlabel="time (s)", ylabel="probability", ylim=(0, 1.1), title=Path(record["path"]).name)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
