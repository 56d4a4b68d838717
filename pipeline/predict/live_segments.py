"""A live stream's segments, closed as the prediction changes, by the recordings' rule (merge_segments)."""

from __future__ import annotations

from pipeline.predict.outputs import EPS, merge_segments


class OpenSegments:
    """A stream's segments, closed as the prediction changes: merge_segments (the recordings' rule, short
    segments absorbed) over the windows since the last closed segment. A segment is closed once a later one
    is at least `min_length` long, as a shorter one may still be absorbed; memory holds only the open
    segments' windows."""

    def __init__(self, min_length: float) -> None:
        self.min_length = min_length
        self.windows: list[dict] = []
        self.boundary: float | None = None  # where the last closed segment ends

    def add(self, window: dict) -> list[dict]:
        """Take a window's record; the segments it closed (oldest first)."""
        self.windows.append(window)
        segments = self._merged()
        settled = [j for j in range(1, len(segments)) if self._length(segments[j]) >= self.min_length - EPS]
        if not settled:
            return []
        cut = segments[settled[-1]]["start"]
        self.windows = [w for w in self.windows if (w["start"] + w["end"]) / 2 > cut]
        self.boundary = cut
        return segments[: settled[-1]]

    def close(self) -> list[dict]:
        """The segments still open, closed by the end of the stream."""
        segments, self.windows = self._merged(), []
        return segments

    def _merged(self) -> list[dict]:
        """merge_segments over the open windows, the first starting where the last closed one ended (as it
        does when all windows are merged at once: halfway between the two windows' centres)."""
        segments = merge_segments(self.windows, self.min_length)
        if segments and self.boundary is not None and self.windows[0].get("prediction") is not None:
            segments[0]["start"] = round(self.boundary, 3)
        return segments

    @staticmethod
    def _length(segment: dict) -> float:
        return segment["end"] - segment["start"]
