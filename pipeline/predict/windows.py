"""Windows of a long recording, cut by its frames' own timestamps (a phone's variable frame rate
included): which frames each window holds, and the times it covers.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

import numpy as np

from pipeline.data.video import count_frames, frame_times

EPS = 1e-4  # seconds: timestamps closer than this are the same instant (frames are never this close)


def probe_video(path: str) -> list[float]:
    """Each decodable frame's time in seconds from the first (frame_times over count_frames); runs in a
    worker process (a decoder may crash)."""
    return frame_times(path, count_frames(path))


def frame_step(times: Sequence[float]) -> float:
    """The typical spacing of frames (the median gap), which the last frame is taken to last."""
    gaps = np.diff(np.asarray(times, dtype=np.float64))
    gaps = gaps[gaps > EPS]
    return float(np.median(gaps)) if len(gaps) else 1 / 30


def recording_end(times: Sequence[float]) -> float:
    """When the last frame ends: its time plus the typical spacing."""
    return float(times[-1]) + frame_step(times)


def frame_end(times: Sequence[float], index: int) -> float:
    """When frame `index` ends: the next frame's time (the recording's end for the last frame)."""
    return float(times[index + 1]) if index + 1 < len(times) else recording_end(times)


def window_spans(times: Sequence[float], window_s: float, stride_s: float) -> list[tuple[int, int, float, float]]:
    """(first frame, frame count, start s, end s) of each window: the frames whose timestamps fall in
    [t, t + window) for t = 0, stride, 2 stride, ... while the window fits, plus one window of the frames
    in the last `window` seconds when the stride leaves a tail, so every frame is classified. Times are
    the frames' own: the first frame's time, and the end of the last frame. A recording no longer than
    one window is one window of all its frames; a stretch with no frame gives no window."""
    n, end = len(times), recording_end(times)
    if n == 0:
        return []
    if end <= window_s + EPS:
        return [(0, n, 0.0, round(end, 3))]
    spans: list[tuple[int, int]] = []
    k = 0
    while k * stride_s + window_s <= end + EPS:
        t = k * stride_s
        first, stop = bisect_left(times, t - EPS), bisect_left(times, t + window_s - EPS)
        if stop > first:
            spans.append((first, stop - first))
        k += 1
    if not spans or sum(spans[-1]) < n:
        first = bisect_left(times, end - window_s - EPS)
        spans.append((first, n - first))
    return [(f, c, round(float(times[f]), 3), round(frame_end(times, f + c - 1), 3)) for f, c in spans]
