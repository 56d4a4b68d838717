"""The records predict returns: one per query clip (its prediction, or why it failed), and for a long
recording its windows (each with its own times, prediction and, under an unknown rule, the underlying
action, score and threshold) and their segments.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.data.protocol import FRAMES
from pipeline.data.video import sample_indices

UNKNOWN_FIELDS = ("action", "score", "score_name", "threshold")  # what an unknown rule adds to a row


def repeated_note(frames: int) -> str:
    """Why a clip or window of fewer than L frames still has a prediction."""
    indices = sample_indices(frames, repeat_short=True)
    return (
        f"{frames} frame{'s' if frames != 1 else ''}, fewer than the {FRAMES} the model takes: frames repeated "
        f"(indices {', '.join(map(str, indices))})"
    )


def failed_fields(reason: Any) -> dict[str, Any]:
    """The fields of a query that has no prediction."""
    return {
        "status": "failed",
        "reason": reason,
        "prediction": None,
        "probability": None,
        "probabilities": {},
        "top_k": [],
        "logits": {},
    }


def clip_record(path: str, result: torch.Tensor | str, row: dict | None, frames: int | None) -> dict[str, Any]:
    """One query clip: its classified row, or failed with the reason (its decoder's or the row's)."""
    record: dict[str, Any] = {"path": path}
    if row is not None and "failed" not in row:
        record.update(status="ok", reason=None, **row)
    else:
        record.update(failed_fields(row["failed"] if row is not None else result))
    if frames is not None:
        record["note"] = repeated_note(frames)
    return record


def window_record(times: tuple[float, float], frames: int, result: torch.Tensor | str, row: dict | None) -> dict:
    """One window of a recording: its times by the frames' timestamps, its prediction and probabilities,
    and under an unknown rule the underlying action, score and threshold (kept when labelled unknown)."""
    window: dict[str, Any] = {"start": round(times[0], 3), "end": round(times[1], 3), "frames": frames}
    if row is None or "failed" in row:
        window.update(
            prediction=None,
            probability=None,
            probabilities={},
            reason=row["failed"] if row is not None else result,
        )
    else:
        window.update(prediction=row["prediction"], probability=row["probability"], probabilities=row["probabilities"])
        window.update({k: row[k] for k in UNKNOWN_FIELDS if k in row})
    if frames < FRAMES:
        window["note"] = repeated_note(frames)
    return window
