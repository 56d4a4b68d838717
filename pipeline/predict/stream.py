"""Live streams: a camera, an rtsp/http/tcp/udp URL or a file still being written, classified as it plays.

A reader thread decodes frames as they arrive (PyAV) into a buffer that holds the last window and one
stride, timed by the frames' own timestamps from the first frame. Windows lie on the grid a recording's
do (windows.py: [k * stride, k * stride + window), frames by timestamp, a window ending where the next
frame starts), and one is complete once a frame past its end has arrived. The classifier takes the
newest complete window each time: its L frames by load_window's test-view rule over the buffer, then
the checkpoint's recipe and the heads, exactly as a recording's window; windows that completed while it
worked are skipped and counted, never queued. A connection that drops (an error, or no data for the
timeout) or closes (a killed server closes its socket exactly as a finished one does) is reopened
`reconnect` times with a doubling backoff; when none connects the stream ends, cleanly after a close,
with StreamLost after an error. A file is followed as it grows and ends after the timeout without data.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch

from pipeline.data.video import ViewSpec, draw_crop, resize_short_side, sample_indices
from pipeline.features.backbones import patch_features
from pipeline.features.extract import NOT_FINITE
from pipeline.predict.clips import FeatureMaker, PredictError
from pipeline.predict.live_segments import OpenSegments
from pipeline.predict.records import window_record
from pipeline.predict.windows import EPS, frame_step

MAX_FRAMES = 2000  # the buffer's bound whatever the timestamps say (a stream whose frames share one time)
LATENCIES = 2000  # the most recent latencies kept for the summary's percentiles
SKIP_NOTICE_S = 10.0  # at most one "windows skipped" notice this often


class StreamLost(PredictError):
    """A live source that failed (an error, or no data for the timeout) and came back in none of the reconnects."""


@dataclass(frozen=True)
class StreamSettings:
    """Windows of `window` s every `stride` s; `reconnect` tries after a drop, the first `backoff_s` later and
    each next one twice as late; `timeout_s` for opening and for each read (a growing file's end)."""

    window: float = 2.0
    stride: float = 2.0
    min_segment: float = 1.0
    reconnect: int = 3
    backoff_s: float = 1.0
    timeout_s: float = 10.0


@dataclass
class Frame:
    """A decoded frame: its stream time (s from the first frame), when it left the decoder, and the image."""

    t: float
    arrived: float  # time.perf_counter()
    image: av.VideoFrame


@dataclass
class StreamStats:
    """What a stream did so far: frames, windows classified and skipped, reconnects, busy time, latencies."""

    frames: int = 0
    windows: int = 0
    skipped: int = 0
    reconnects: int = 0
    decode_s: float = 0.0  # the reader's time decoding (and handing frames to on_frame)
    classify_s: float = 0.0  # the classifier's time: frames to features to a prediction
    stream_s: float = 0.0  # stream time seen: the last frame's time
    ended: str = ""
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCIES))

    def summary(self) -> dict[str, Any]:
        """The JSON-ready summary: counts, the latency's median and 95th percentile (from a window's last
        frame leaving the decoder to its prediction), and the real-time factor (busy s per stream s)."""
        lat = np.asarray(self.latencies, dtype=np.float64)
        busy = self.decode_s + self.classify_s
        return {
            "frames": self.frames,
            "stream_s": round(self.stream_s, 3),
            "windows": self.windows,
            "skipped": self.skipped,
            "reconnects": self.reconnects,
            "latency_p50_s": round(float(np.percentile(lat, 50)), 4) if len(lat) else None,
            "latency_p95_s": round(float(np.percentile(lat, 95)), 4) if len(lat) else None,
            "realtime_factor": round(busy / self.stream_s, 4) if self.stream_s > 0 else None,
            "ended": self.ended,
        }


@dataclass
class StreamWindow:
    """One classified window: its JSON record (kind, start, end, frames, time, latency_s, prediction,
    probability, probabilities, top_k and, under an unknown rule, unknown, action, score, threshold), the
    segments it closed, when its last frame arrived (time.perf_counter) and the windows skipped before it."""

    record: dict[str, Any]
    segments: list[dict[str, Any]]
    arrived: float
    skipped: int = 0

    @property
    def prediction(self) -> str | None:
        return self.record["prediction"]

    @property
    def probability(self) -> float | None:
        return self.record["probability"]


# ---------------------------------------------------------------------------------------------- frames


def window_view(images: list[av.VideoFrame], spec: ViewSpec) -> torch.Tensor:
    """The test view of a window's frames, uint8 [L, 3, crop, crop]: load_window's rule (sample_indices with
    repeats, the short side resized, the centre square) over frames already decoded; only the L picked are
    converted to RGB. Each frame is resized on its own, so a size change mid-stream cannot break a window."""
    indices = sample_indices(len(images), repeat_short=True)
    views = {}
    for i in sorted(set(indices)):
        rgb = torch.from_numpy(images[i].to_ndarray(format="rgb24")).permute(2, 0, 1)
        resized = resize_short_side(rgb[None], spec)
        views[i] = draw_crop(resized.shape[-2], resized.shape[-1], False, None, spec).apply(resized[0])
    return torch.stack([views[i] for i in indices])


def window_features(maker: FeatureMaker, view: torch.Tensor) -> torch.Tensor | str:
    """[L, P*P, D] float16 features of a view as extraction makes them (patch_features under the recipe's
    precision), or why not (features that are not finite)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(maker.recipe.precision)
    autocast = torch.autocast(maker.device.type, dtype=dtype) if dtype else nullcontext()
    with torch.inference_mode(), autocast:
        features = patch_features(
            maker.backbone, view.to(maker.device), normalize=maker.recipe.normalize, patches=maker.recipe.patches
        ).cpu()
    return features if torch.isfinite(features).all() else NOT_FINITE


# ---------------------------------------------------------------------------------------------- reading


def source_kind(source: str) -> str:
    """ "network" for a URL (any protocol FFmpeg opens), "device" for /dev/... (a camera), else "file"."""
    if "://" in source:
        return "network"
    return "device" if source.startswith("/dev/") else "file"


def check_source(source: str) -> None:
    """PredictError at once for a file that is not there (a URL or camera is only known by trying it)."""
    if source_kind(source) == "file" and not Path(source).is_file():
        raise PredictError(f"--stream {source}: no such file (or a URL, e.g. tcp://HOST:PORT, or a camera /dev/video0)")


def open_source(source: str, kind: str, timeout_s: float) -> Any:  # av InputContainer
    """The source opened live: a file followed as it grows (FFmpeg's follow), a camera through v4l2, and
    `timeout_s` for opening and for each read, after which PyAV raises ExitError."""
    options = {"follow": "1"} if kind == "file" else {}
    return av.open(
        source,
        format="v4l2" if kind == "device" else None,
        options=options,
        timeout=(timeout_s, timeout_s),
        metadata_errors="ignore",
    )


def _reason(err: BaseException, source: str) -> str:
    """An FFmpeg error as a short reason, without the source repeated."""
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return str(text).replace(f": '{source}'", "").strip()


class FrameBuffer:
    """The frames of the last window and stride, shared by the reader thread and the classifier."""

    def __init__(self, keep_s: float) -> None:
        self.keep_s = keep_s
        self.frames: deque[Frame] = deque(maxlen=MAX_FRAMES)
        self.changed = threading.Condition()
        self.finished, self.lost, self.ended = False, False, ""
        self.notices: deque[str] = deque(maxlen=100)

    def add(self, frame: Frame) -> None:
        with self.changed:
            self.frames.append(frame)
            while self.frames[0].t < frame.t - self.keep_s - EPS:
                self.frames.popleft()
            self.changed.notify_all()

    def notice(self, text: str) -> None:
        with self.changed:
            self.notices.append(text)
            self.changed.notify_all()

    def finish(self, ended: str, lost: bool) -> None:
        with self.changed:
            self.finished, self.lost, self.ended = True, lost, ended
            self.changed.notify_all()


class Reader(threading.Thread):
    """Decodes the source into the buffer as frames arrive, reopening it after a drop (module docstring)."""

    def __init__(
        self,
        source: str,
        settings: StreamSettings,
        buffer: FrameBuffer,
        stats: StreamStats,
        on_frame: Callable[[np.ndarray, float], None] | None,
    ) -> None:
        super().__init__(name="strm-stream-reader", daemon=True)  # a read blocked in FFmpeg cannot hold up exit
        self.source, self.kind, self.settings = source, source_kind(source), settings
        self.buffer, self.stats, self.on_frame = buffer, stats, on_frame
        self.stop = threading.Event()
        self.times: deque[float] = deque(maxlen=32)  # recent stream times, for the typical frame spacing
        self.base: float | None = None  # the raw time that stream time `offset` stands for, per connection
        self.offset = 0.0

    def run(self) -> None:
        try:
            ended, lost = self._follow()
        except Exception as err:  # noqa: BLE001 - whatever stops the reader ends the stream with its reason
            ended, lost = (str(err) if isinstance(err, PredictError) else f"{type(err).__name__}: {err}"), True
        self.buffer.finish(ended, lost)

    def _follow(self) -> tuple[str, bool]:
        """Connections until the source ends, is lost or stop is set: (why it ended, whether lost)."""
        s = self.settings
        tries, outage, connected = 0, None, False  # outage: why the last connection that gave frames ended
        while True:
            frames, why = self._connection()
            if self.stop.is_set():
                return "stopped", False
            if frames:
                if tries:
                    self.stats.reconnects += 1
                    self.buffer.notice(f"reconnected (try {tries})")
                tries, outage, connected = 0, why, True
            if self.kind == "file":  # read to its end (no new data for the timeout): lost only when never read
                return why or "the end of the file (no new data for the timeout)", not connected
            if tries >= s.reconnect:
                if connected and outage is None:
                    return "the source closed" + (f" and {tries} reconnect tries found no more" if tries else ""), False
                return (why or "the source closed") + (f"; {tries} reconnect tries failed" if tries else ""), True
            tries += 1
            delay = s.backoff_s * 2 ** (tries - 1)
            self.buffer.notice(
                f"{why or 'the source closed'}: reconnecting in {delay:g} s (try {tries} of {s.reconnect})"
            )
            if self.stop.wait(delay):
                return "stopped", False

    def _connection(self) -> tuple[int, str | None]:
        """One connection's frames into the buffer: (frames, why it ended; None when the input ended)."""
        try:
            container = open_source(self.source, self.kind, self.settings.timeout_s)
        except av.ExitError:
            return 0, f"cannot open: no answer in {self.settings.timeout_s:g} s"
        except (av.FFmpegError, OSError) as err:
            if self.kind == "file":
                raise PredictError(f"cannot open: {_reason(err, self.source)}") from None
            return 0, f"cannot open: {_reason(err, self.source)}"
        frames = 0
        with container:
            if not container.streams.video:
                raise PredictError("no video stream")
            stream = container.streams.video[0]
            stream.thread_count = 1  # a frame leaves the decoder with its packet: no frame-threading delay
            self.base = None  # timestamps start afresh with each connection
            try:
                for packet in container.demux(stream):
                    frames += self._decode(stream, packet)
                    if self.stop.is_set():
                        return frames, None
            except av.ExitError:  # no data for timeout_s: a growing file's end, a network source's drop
                frames += self._decode(stream, None)
                return frames, None if self.kind == "file" else f"no data for {self.settings.timeout_s:g} s"
            except (av.FFmpegError, OSError) as err:
                return frames, _reason(err, self.source)
        return frames, None

    def _decode(self, stream: Any, packet: av.Packet | None) -> int:
        """The frames one packet gives (None: the decoder's last ones), timed and into the buffer."""
        start = time.perf_counter()
        try:
            images = stream.decode(packet)
        except av.InvalidDataError:  # a damaged packet (live streams lose some): its frame is skipped
            images = []
        for image in images:
            t = self._time(image.time)
            if self.on_frame is not None:
                self.on_frame(image.to_ndarray(format="rgb24"), t)
            self.buffer.add(Frame(t, time.perf_counter(), image))
            self.stats.frames += 1
            self.stats.stream_s = t
        self.stats.decode_s += time.perf_counter() - start
        return len(images)

    def _time(self, raw: float | None) -> float:
        """Stream time: seconds from the first frame, going on one frame step after the last one across a
        reconnect or a timestamp that jumps back (a restarted server), so it never decreases."""
        last = self.times[-1] if self.times else None
        step = frame_step(list(self.times))
        raw = raw if raw is not None and math.isfinite(raw) else None  # a flushed frame's time can be NaN
        if raw is not None and (self.base is None or (last is not None and raw - self.base + self.offset < last - EPS)):
            self.base, self.offset = raw, (0.0 if last is None else last + step)
        if raw is None or self.base is None:
            t = 0.0 if last is None else last + step
        else:
            t = raw - self.base + self.offset
        self.times.append(t)
        return t


# ---------------------------------------------------------------------------------------------- windows


class LiveStream:
    """Windows of a live source as they complete (iterate it once); close() stops the reader and gives the
    segments still open. `classify(frames)` is the recognizer's row for a window's frames."""

    def __init__(
        self,
        source: str,
        settings: StreamSettings,
        classify: Callable[[list[av.VideoFrame]], dict],
        on_frame: Callable[[np.ndarray, float], None] | None = None,
        on_notice: Callable[[str], None] | None = None,
    ) -> None:
        self.source, self.settings, self.classify, self.on_notice = str(source), settings, classify, on_notice
        self.stats = StreamStats()
        self.buffer = FrameBuffer(settings.window + settings.stride)
        self.reader = Reader(self.source, settings, self.buffer, self.stats, on_frame)
        self.segments = OpenSegments(settings.min_segment)
        self._closed: list[dict] | None = None
        self._skip_told = -math.inf

    def __iter__(self) -> Iterator[StreamWindow]:
        if self.reader.ident is not None:
            raise RuntimeError("a LiveStream is iterated once")
        blank = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
        self.classify([blank])  # lazy imports and kernels set up before the first frame: its window is as fast as any
        self.reader.start()
        self._tell(f"reading: windows of {self.settings.window:g} s every {self.settings.stride:g} s")
        try:
            yield from self._windows()
        finally:
            self.stop()
        if self.buffer.lost:
            raise StreamLost(f"{self.source}: {self.buffer.ended}")

    def stop(self) -> None:
        """Stop reading (the reader ends at its next packet, or after the timeout when the source is silent)."""
        self.reader.stop.set()
        if self.reader.ident is not None:
            self.reader.join(timeout=1.0)
        self.stats.ended = self.buffer.ended or "stopped"

    def close(self) -> list[dict]:
        """Stop, and the segments still open (closed by the end); once."""
        self.stop()
        if self._closed is None:
            self._closed = self.segments.close()
            return self._closed
        return []

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, **self.stats.summary(), "lost": self.buffer.lost}

    def sentence(self) -> str:
        """The summary as a person reads it."""
        s = self.summary()
        skipped = f" ({s['skipped']} skipped: classification fell behind)" if s["skipped"] else ""
        return (
            f"{s['windows']} windows{skipped} of {s['frames']} frames, {s['stream_s']:.1f} s of stream; "
            f"{s['reconnects']} reconnects; latency p95 {s['latency_p95_s']} s; real-time factor "
            f"{s['realtime_factor']}; ended: {s['ended']}"
        )

    def _tell(self, text: str | None = None) -> None:
        """Hand the reader's notices (and `text`) to on_notice, from the iterating thread, each after the source."""
        with self.buffer.changed:
            notices = list(self.buffer.notices) + ([text] if text else [])
            self.buffer.notices.clear()
        for notice in notices:
            if self.on_notice is not None:
                self.on_notice(f"{self.source}: {notice}")

    def _newest(self) -> int:
        """The newest complete window's index on the stride grid (-1 when none): a frame past its end arrived."""
        if not self.buffer.frames:
            return -1
        s, last = self.settings, self.buffer.frames[-1].t
        return math.floor((last - s.window + EPS) / s.stride) if last >= s.window - EPS else -1

    def _pick(self, lo: float, hi: float, end: float | None = None) -> tuple[list[Frame], float] | None:
        """The buffered frames timed in [lo, hi) and when the window ends: the next frame's time, else `end`."""
        frames = [f for f in self.buffer.frames if lo - EPS <= f.t < hi - EPS]
        after = next((f.t for f in self.buffer.frames if f.t >= hi - EPS), end)
        return (frames, after) if frames and after is not None else None

    def _windows(self) -> Iterator[StreamWindow]:
        s, done = self.settings, -1  # done: the last grid window classified (or passed)
        while True:
            self._tell()
            with self.buffer.changed:
                k, finished = self._newest(), self.buffer.finished
                if k <= done and not finished:
                    self.buffer.changed.wait(0.2)
                    continue
                picked = self._pick(k * s.stride, k * s.stride + s.window) if k > done else None
            if k > done:
                skipped, done = k - done - 1, k
                if picked is not None:
                    yield self._window(*picked, skipped)
                continue
            yield from self._final(done)
            return

    def _final(self, done: int) -> Iterator[StreamWindow]:
        """At the end, as window_spans ends a recording: the window the last frame's end completes, then one
        of the last `window` seconds when frames are left after it; a stream shorter than one window is one."""
        s = self.settings
        if not self.buffer.frames:
            return
        last = self.buffer.frames[-1].t
        end = last + frame_step([f.t for f in self.buffer.frames])
        if done < 0 and end <= s.window + EPS:
            picked = self._pick(0.0, math.inf, end)
            if picked is not None:
                yield self._window(*picked, 0)
            return
        k = math.floor((end - s.window + EPS) / s.stride)
        if k > done:
            picked = self._pick(k * s.stride, k * s.stride + s.window, end)
            if picked is not None:
                yield self._window(*picked, k - done - 1)
            done = k
        if last >= done * s.stride + s.window - EPS:
            picked = self._pick(end - s.window, math.inf, end)
            if picked is not None:
                yield self._window(*picked, 0)

    def _window(self, frames: list[Frame], end: float, skipped: int) -> StreamWindow:
        """Classify a window's frames; its record, and the segments it closes."""
        start = time.perf_counter()
        row = self.classify([f.image for f in frames])
        now = time.perf_counter()
        record: dict[str, Any] = {"kind": "window", **window_record((frames[0].t, end), len(frames), "", row)}
        record["top_k"] = row.get("top_k", [])
        if "threshold" in row:
            record["unknown"] = record["prediction"] == "unknown"
        latency = now - frames[-1].arrived
        record.update(time=datetime.now(timezone.utc).isoformat(timespec="milliseconds"), latency_s=round(latency, 4))
        if skipped:
            record["skipped"] = skipped
        stats = self.stats
        stats.classify_s += now - start
        stats.windows, stats.skipped = stats.windows + 1, stats.skipped + skipped
        stats.latencies.append(latency)
        if skipped and now - self._skip_told >= SKIP_NOTICE_S:
            self._skip_told = now
            self._tell(f"classification is behind the stream: {stats.skipped} window(s) skipped so far")
        return StreamWindow(record, self.segments.add(record), frames[-1].arrived, skipped)
