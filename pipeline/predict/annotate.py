"""Predictions drawn on the video they came from: each frame shows the prediction in effect at its time
(its probability, or `unknown` in its own colour) and the top actions as small bars, and a recording's
frames a timeline strip of its segments (the true ones beside them when known) with a cursor at the
frame's time. Frames are written with PyAV (H.264 where its FFmpeg has libx264, else MPEG-4 Part 2), one
for each input frame at that frame's own time, so the output has the input's frame count and timing.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import threading
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from av.video.stream import VideoStream
from PIL import Image, ImageDraw, ImageFont

from pipeline.data.video import VideoError, frame_rate, iter_frames
from pipeline.predict.outputs import EPS, UNKNOWN, UNKNOWN_COLOUR, action_colours, owned_spans, unused_path, windowed
from pipeline.predict.stream import StreamWindow

MIN_SIDE = 360  # pixels: a smaller frame is enlarged by a whole factor (nearest neighbour) so its text is legible
# Each codec's time base: 1/90000 s (MPEG's clock) holds 12, 24, 25, 29.97, 30 and 60 fps exactly; MPEG-4
# Part 2 admits denominators up to 65535 only, and 1/30000 holds those rates too.
CODECS = {"libx264": Fraction(1, 90000), "mpeg4": Fraction(1, 30000)}
PANEL_ALPHA = 0.62  # the panel's and strip's dark backing: the video stays visible beneath
PANELS_KEPT = 512  # rendered panels cached (a stream's states repeat); the cache is emptied past this


@dataclass(frozen=True)
class Timeline:
    """A recording's segments for the strip along the bottom, each (start s, end s, label), over `duration`
    seconds: the predicted ones, and the true ones when known."""

    duration: float
    predicted: tuple[tuple[float, float, str], ...]
    truth: tuple[tuple[float, float, str], ...] | None = None


@dataclass(frozen=True)
class FrameState:
    """What a frame shows: the prediction in effect (an action, "unknown", or None where nothing was
    classified), its probability, the top actions as (name, probability), and the recording's timeline."""

    prediction: str | None
    probability: float | None = None
    top_k: tuple[tuple[str, float], ...] = ()
    timeline: Timeline | None = None


def _encoder() -> str:
    """libx264 when PyAV's FFmpeg has it, else the MPEG-4 Part 2 encoder every FFmpeg build has."""
    try:
        av.Codec("libx264", "w")
        return "libx264"
    except ValueError:  # av's UnknownCodecError
        return "mpeg4"


def _rgb255(colour: Sequence[float]) -> tuple[int, int, int]:
    return (round(colour[0] * 255), round(colour[1] * 255), round(colour[2] * 255))


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's own font at `size` pixels (no font file needed)."""
    return ImageFont.load_default(size=size)


class Annotator:
    """RGB frames in, annotated frames out to `out_path`, one at a time (a live stream's loop calls `write`
    per frame). Written under a temporary name and renamed on a clean close, so a present file is whole."""

    def __init__(
        self,
        out_path: Path | str,
        width: int,
        height: int,
        rate: float,
        class_names: Sequence[str],
        *,
        min_side: int = MIN_SIDE,
    ) -> None:
        self.path = Path(out_path)
        self.source_size = (height, width)
        self.scale = max(1, math.ceil(min_side / min(width, height)))
        self.width, self.height = (
            width * self.scale + width * self.scale % 2,
            height * self.scale + height * self.scale % 2,
        )
        self.colours = {a: _rgb255(c) for a, c in action_colours(class_names).items()} | {
            UNKNOWN: _rgb255(UNKNOWN_COLOUR)
        }
        self.text_size = max(10, round(self.height / 26))
        self.font, self.small = _font(round(self.text_size * 1.3)), _font(self.text_size)
        self.codec = _encoder()
        self.time_base = CODECS[self.codec]
        self.frames = 0
        self._to_yuv = VideoReformatter()  # one conversion context for all frames
        self._last_pts = -1
        self._panels: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._strip: tuple[Timeline, np.ndarray, np.ndarray] | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = self.path.with_name(f".{self.path.stem}.part{self.path.suffix or '.mp4'}")
        try:
            self._container = av.open(str(self._partial), mode="w")
        except ValueError:  # FFmpeg knows no container by this suffix
            raise OSError(
                errno.EINVAL, "no video format has this suffix (use .mp4, .mkv or .mov)", str(self.path)
            ) from None
        # ultrafast: annotating the bench's 30 s recording (360 frames at 384 px) took 0.74-0.79 CPU s against
        # veryfast's 1.34, for a file 2.4x larger (1.8 MB); annotating stays a small part of predicting.
        options = {"crf": "20", "preset": "ultrafast"} if self.codec == "libx264" else {}
        stream = self._container.add_stream(self.codec, rate=Fraction(rate).limit_denominator(10000), options=options)
        assert isinstance(stream, VideoStream)  # a video codec's stream
        self._stream = stream
        self._stream.width, self._stream.height, self._stream.pix_fmt = self.width, self.height, "yuv420p"
        self._stream.codec_context.time_base = self.time_base
        if self.codec == "mpeg4":
            self._stream.codec_context.bit_rate = int(self.width * self.height * float(rate) * 0.2)

    def __enter__(self) -> Annotator:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
            return
        with contextlib.suppress(av.FFmpegError, OSError):
            self._container.close()
        self._partial.unlink(missing_ok=True)

    def write(self, frame: np.ndarray, pts_seconds: float, state: FrameState) -> None:
        """Draw `state` on `frame` (RGB uint8 [H, W, 3] of the size given) and write it at `pts_seconds`
        (a time that is not after the last frame's moves one tick on, as a decoder needs)."""
        if frame.shape != (*self.source_size, 3) or frame.dtype != np.uint8:
            raise ValueError(f"a frame of {frame.shape} {frame.dtype}; expected {(*self.source_size, 3)} uint8")
        image = self._enlarge(frame)
        margin = max(2, self.text_size // 2)
        _blend(image, *self._panel(state), margin, margin)
        if state.timeline is not None:
            self._draw_timeline(image, state.timeline, pts_seconds)
        pts = max(round(pts_seconds / self.time_base), self._last_pts + 1)
        video = self._to_yuv.reformat(av.VideoFrame.from_ndarray(image, format="rgb24"), format="yuv420p")
        video.pts, video.time_base = pts, self.time_base
        self._container.mux(self._stream.encode(video))
        self._last_pts = pts
        self.frames += 1

    def close(self) -> Path:
        """Flush the encoder and move the file into place; ValueError when no frame was written."""
        if self.frames == 0:
            with contextlib.suppress(av.FFmpegError, OSError):
                self._container.close()
            self._partial.unlink(missing_ok=True)
            raise ValueError(f"{self.path}: no frame was written")
        self._container.mux(self._stream.encode(None))
        self._container.close()
        os.replace(self._partial, self.path)
        return self.path

    # ------------------------------------------------------------------ drawing

    def _enlarge(self, frame: np.ndarray) -> np.ndarray:
        """The frame at the output's size: enlarged by the whole factor, its edge repeated to an even size."""
        size = (frame.shape[1] * self.scale, frame.shape[0] * self.scale)
        image = (
            np.array(Image.fromarray(frame).resize(size, Image.Resampling.NEAREST)) if self.scale > 1 else frame.copy()
        )
        pad = ((0, self.height - image.shape[0]), (0, self.width - image.shape[1]), (0, 0))
        return np.pad(image, pad, mode="edge") if any(p[1] for p in pad) else image

    def _panel(self, state: FrameState) -> tuple[np.ndarray, np.ndarray]:
        """The panel of a state (premultiplied RGB, 1 - alpha), rendered once per distinct look."""
        key = (
            state.prediction,
            None if state.probability is None else round(state.probability, 2),
            tuple((a, round(p, 2)) for a, p in state.top_k),
        )
        if key not in self._panels:
            if len(self._panels) >= PANELS_KEPT:
                self._panels.clear()
            self._panels[key] = _premultiplied(self._render_panel(*key))
        return self._panels[key]

    def _render_panel(self, prediction: str | None, probability: float | None, top_k: tuple) -> Image.Image:
        """The prediction (its colour) and probability, then one bar per top action, on a dark backing."""
        pad, bar = max(2, self.text_size // 2), self.text_size * 4
        head = prediction if prediction is not None else "no prediction"
        head_colour = self.colours.get(head, (255, 255, 255))
        value = f"  {probability:.2f}" if probability is not None and prediction != UNKNOWN else ""
        rows = [f"{a} {p:.2f}" for a, p in top_k]
        width = max([self.font.getlength(head + value)] + [bar + pad + self.small.getlength(r) for r in rows])
        row_h = round(self.text_size * 1.25)
        size = (
            min(self.width - 2 * pad, round(width) + 2 * pad),
            round(self.text_size * 1.6) + len(rows) * row_h + 2 * pad,
        )
        panel = Image.new("RGBA", size, (0, 0, 0, round(255 * PANEL_ALPHA)))
        draw = ImageDraw.Draw(panel)
        draw.text((pad, pad), head, font=self.font, fill=(*head_colour, 255))
        if value:
            draw.text((pad + self.font.getlength(head), pad), value, font=self.font, fill=(255, 255, 255, 255))
        y = pad + round(self.text_size * 1.6)
        for (action, p), text in zip(top_k, rows, strict=True):
            top, bottom = y + row_h // 4, y + row_h - row_h // 4
            draw.rectangle((pad, top, pad + bar, bottom), fill=(70, 70, 70, 255))
            draw.rectangle((pad, top, pad + round(bar * p), bottom), fill=(*self.colours.get(action, (255,) * 3), 255))
            draw.text((2 * pad + bar, y), text, font=self.small, fill=(255, 255, 255, 255))
            y += row_h
        return panel

    def _draw_timeline(self, image: np.ndarray, timeline: Timeline, t: float) -> None:
        """The strip of segments along the bottom, rendered once per timeline, and a cursor at time t."""
        if self._strip is None or self._strip[0] != timeline:  # a live stream's growing timeline replaces the last
            self._strip = (timeline, *_premultiplied(self._render_strip(timeline)))
        _, rgb, keep = self._strip
        top = self.height - rgb.shape[0]
        _blend(image, rgb, keep, top, 0)
        x = min(self.width - 2, max(0, round(t / max(timeline.duration, EPS) * self.width)))
        image[top:, x : x + 2] = 255

    def _render_strip(self, timeline: Timeline) -> Image.Image:
        """One row per kind of segment (true above predicted), each segment in its action's colour."""
        rows = ([("true", timeline.truth)] if timeline.truth else []) + [("predicted", timeline.predicted)]
        row_h, gap = max(6, round(self.text_size * 1.1)), 2
        strip = Image.new("RGBA", (self.width, len(rows) * (row_h + gap) + gap), (0, 0, 0, round(255 * PANEL_ALPHA)))
        draw = ImageDraw.Draw(strip)
        scale = self.width / max(timeline.duration, EPS)
        for k, (name, segments) in enumerate(rows):
            y = gap + k * (row_h + gap)
            for start, end, label in segments:
                x0, x1 = round(start * scale), max(round(start * scale) + 1, round(end * scale) - 1)
                draw.rectangle((x0, y, x1, y + row_h - 1), fill=(*self.colours.get(label, (255,) * 3), 235))
            font = _font(max(8, row_h - 2))
            draw.text((3, y), name, font=font, fill=(255, 255, 255, 255), stroke_width=1, stroke_fill=(0, 0, 0, 255))
        return strip


def _premultiplied(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """RGBA -> (RGB * alpha, 1 - alpha) as float32, what blending a frame needs."""
    array = np.asarray(image, dtype=np.float32)
    alpha = array[..., 3:] / 255
    return array[..., :3] * alpha, 1 - alpha


def _blend(image: np.ndarray, rgb: np.ndarray, keep: np.ndarray, top: int, left: int) -> None:
    """Alpha-blend a premultiplied overlay into `image` at (top, left), in place, clipped to the image."""
    h, w = min(rgb.shape[0], image.shape[0] - top), min(rgb.shape[1], image.shape[1] - left)
    region = image[top : top + h, left : left + w]
    region[:] = (region * keep[:h, :w] + rgb[:h, :w] + 0.5).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- records


def clip_state(record: dict, top_k: int = 3) -> FrameState:
    """A clip's one prediction, for all its frames."""
    ranked = tuple((str(a), float(p)) for a, p in record.get("top_k", [])[:top_k])
    return FrameState(record["prediction"], record["probability"], ranked)


def recording_timeline(record: dict, truth: Sequence[dict] | None = None) -> Timeline:
    """A windowed record's segments (and the true ones, {start, end, action}) over the recording's length."""
    ends = [w["end"] for w in record["windows"]] + [s["end"] for s in truth or []]
    return Timeline(
        float(max(ends)),
        tuple((s["start"], s["end"], s["prediction"]) for s in record["segments"]),
        tuple((s["start"], s["end"], s["action"]) for s in truth) if truth else None,
    )


def states_in_effect(
    record: dict, truth: Sequence[dict] | None = None, top_k: int = 3
) -> Callable[[float], FrameState]:
    """time (s) -> the state of the window in effect then: the one that owns the time (owned_spans, as the
    segments are cut), with its own probabilities' top actions, and the recording's timeline."""
    timeline = recording_timeline(record, truth)
    windows = record["windows"]
    starts = [lo for lo, _ in owned_spans(windows)]
    states = []
    for w in windows:
        ranked = sorted(w.get("probabilities", {}).items(), key=lambda item: -item[1])[:top_k]
        states.append(FrameState(w["prediction"], w["probability"], tuple(ranked), timeline))
    return lambda t: states[max(0, bisect_right(starts, t + EPS) - 1)]


def annotate_video(
    source: Path | str, out: Path | str, class_names: Sequence[str], state_at: Callable[[float], FrameState]
) -> Path:
    """`source` decoded once more, every frame written to `out` with the state in effect at its time."""
    frames = iter_frames(source)
    first = next(frames, None)
    if first is None:
        raise VideoError(source, "no decodable frame")
    image, t = first
    with Annotator(out, image.shape[1], image.shape[0], frame_rate(source), class_names) as annotator:
        annotator.write(image, t, state_at(t))
        for image, t in frames:
            annotator.write(image, t, state_at(t))
    return Path(out)


def annotate_clip(record: dict, class_names: Sequence[str], out: Path | str, *, top_k: int = 3) -> Path:
    """A clip with its prediction, probability and top actions on every frame."""
    state = clip_state(record, top_k)
    return annotate_video(record["path"], out, class_names, lambda _t: state)


def annotate_recording(
    record: dict, class_names: Sequence[str], out: Path | str, *, truth: Sequence[dict] | None = None, top_k: int = 3
) -> Path:
    """A windowed recording with the window prediction in effect at each frame's time and the timeline strip
    of its segments, the true segments ({start, end, action}) beside them when given."""
    return annotate_video(record["path"], out, class_names, states_in_effect(record, truth, top_k))


def annotate_records(
    records: Sequence[dict], class_names: Sequence[str], out: Path | str, *, top_k: int = 3
) -> list[Path]:
    """Each query that has a prediction as an annotated video (a windowed recording with its timeline):
    to `out` for one query, to OUT-<query name>.mp4 beside it under a name no file holds yet for several."""
    out = Path(out)
    written = []
    for record in records:
        if record["status"] != "ok":
            continue
        path = (
            out
            if len(records) == 1
            else unused_path(out.parent, f"{out.stem}-{Path(record['path']).stem}", out.suffix or ".mp4")
        )
        if windowed(record):
            written.append(annotate_recording(record, class_names, path, top_k=top_k))
        else:
            written.append(annotate_clip(record, class_names, path, top_k=top_k))
    return written


class LiveAnnotation:
    """A live stream's annotated copy: every frame the reader hands over (`on_frame`, in its thread) drawn
    with the newest window's prediction (`on_window`); the file opens on the first frame, at its size.
    Frames of another size (a source that changed resolution) are counted, not written."""

    def __init__(self, out: Path | str, class_names: Sequence[str], *, top_k: int = 3, rate: float = 30.0) -> None:
        self.out, self.class_names, self.top_k, self.rate = Path(out), list(class_names), top_k, rate
        self.state = FrameState(None, None, ())
        self.resized = 0  # frames left out for their size
        self._annotator: Annotator | None = None
        self._lock = threading.Lock()  # the reader may still hand a frame while the stream is closed
        self._closed = False

    def on_frame(self, frame: np.ndarray, t: float) -> None:
        with self._lock:
            if self._closed:
                return
            if self._annotator is None:
                self._annotator = Annotator(self.out, frame.shape[1], frame.shape[0], self.rate, self.class_names)
            if frame.shape[:2] != self._annotator.source_size:
                self.resized += 1
                return
            self._annotator.write(frame, t, self.state)

    def on_window(self, window: StreamWindow) -> None:
        self.state = clip_state(window.record, self.top_k)

    def close(self) -> Path | None:
        """The annotated file, whole (None when no frame arrived)."""
        with self._lock:
            self._closed = True
            if self._annotator is None or self._annotator.frames == 0:
                return None
            return self._annotator.close()
