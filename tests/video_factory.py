"""Tiny real videos for tests: every frame carries its own index, so a test can tell which frames came back.

The index is drawn as a 4 x 4 grid of black/white cells (16 bits, row-major, most significant
first): big flat blocks survive lossy H.264 / MPEG-4 coding, unlike drawn digits at 64 x 48.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import torch

GRID = 4  # cells per side; 16 bits -> indices up to 65535


def index_image(index: int, size: tuple[int, int]) -> np.ndarray:
    """RGB uint8 [H, W, 3] showing `index` as a 4 x 4 grid of black (0) / white (1) cells."""
    width, height = size
    bits = [(index >> (GRID * GRID - 1 - k)) & 1 for k in range(GRID * GRID)]
    cells = np.array(bits, dtype=np.uint8).reshape(GRID, GRID) * 255
    rows = np.arange(height) * GRID // height
    cols = np.arange(width) * GRID // width
    gray = cells[rows[:, None], cols[None, :]]
    return np.repeat(gray[:, :, None], 3, axis=2)


def read_index(frame: torch.Tensor | np.ndarray) -> int:
    """The index drawn into a decoded frame, [3, H, W] or [H, W, 3] (uint8), read from cell centres."""
    array = frame.numpy() if isinstance(frame, torch.Tensor) else np.asarray(frame)
    if array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)
    height, width = array.shape[:2]
    gray = array.astype(np.float32).mean(axis=2)
    value = 0
    for r in range(GRID):
        for c in range(GRID):
            y0, y1 = (4 * r + 1) * height // (4 * GRID), (4 * r + 3) * height // (4 * GRID)
            x0, x1 = (4 * c + 1) * width // (4 * GRID), (4 * c + 3) * width // (4 * GRID)
            value = (value << 1) | int(gray[y0:y1, x0:x1].mean() > 127)
    return value


def write_test_video(
    path: Path | str,
    n_frames: int,
    codec: str = "h264",
    size: tuple[int, int] = (64, 48),
    fps: int = 12,
    *,
    faststart: bool = False,
) -> Path:
    """Encode `n_frames` frames (frame i shows index i) with PyAV; the container follows the suffix.

    codec "h264" uses libx264 with B-frames (so decode order differs from display order);
    "mpeg4" is the Part 2 codec HMDB51/UCF101-era AVIs use. `faststart` puts an MP4's index
    first, so a truncated copy still opens and over-reports its frames.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoder = {"h264": "libx264", "mpeg4": "mpeg4"}[codec]
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), mode="w", options=options) as container:
        stream = container.add_stream(encoder, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        if codec == "h264":
            stream.options = {"crf": "18", "preset": "veryfast", "bframes": "2"}
        else:
            stream.options = {"qscale": "2"}
        for index in range(n_frames):
            frame = av.VideoFrame.from_ndarray(index_image(index, size), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
