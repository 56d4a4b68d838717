"""A variable-frame-rate video for tests, as phones record them: each frame carries its index
(video_factory's grid) and its own timestamp."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
from video_factory import index_image

VFR_TIMES = [k / 10 for k in range(30)] + [3 + k / 30 for k in range(90)]  # 10 fps for 3 s, then 30 fps for 3 s


def write_vfr_video(path: Path | str, times: list[float], size: tuple[int, int] = (64, 48)) -> Path:
    """H.264 (with B-frames) in MP4, frame i showing index i at times[i] seconds (millisecond timestamps)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.options = {"crf": "18", "preset": "veryfast", "bframes": "2"}
        for index, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(index_image(index, size), format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
