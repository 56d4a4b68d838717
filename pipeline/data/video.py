"""Decoding, the frame-sampling rule and the view transforms: the one place that decides which pixels a video gives.

Facts from STRM_SPEC section 10 (the authors' TRX/STRM loader). Extraction and fine-tuning both go
through `load_view` / `load_views`, so a cached feature and a fine-tuned forward see the same frames.

Decoders: torchcodec (FFmpeg; decodes only the frames asked for, seeking between key frames) and
PyAV as the fallback when torchcodec's FFmpeg libraries cannot load. `STRM_DECODER=pyav` forces
the fallback, `STRM_DECODER=torchcodec` forbids it; the default `auto` warns once when it falls back.
Frame i always means the i-th frame in display order, for both decoders. A damaged file (a
truncated tail whose index promises more than there is) is decoded in order with PyAV, so both
decoders agree on what exists.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.data.protocol import FRAMES

if TYPE_CHECKING:
    import av


# Bump whenever sample_indices, transform_view or view_rng change what a view contains: it is part
# of the feature cache's fingerprint, so stale caches are refused instead of silently mixed.
SAMPLING_RULE_VERSION = "trx-linspace8-jitter5/256-224-flip/blake2b-rng/1"

DECODER_ENV = "STRM_DECODER"
DECODERS = ("auto", "torchcodec", "pyav")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")  # the resize modes timm's data configs name


class VideoError(RuntimeError):
    """A video that cannot give the frames asked for; the message is "<path>: <reason>"."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class ViewSpec:
    """Pixel geometry of a view: shorter side resized to `short_side`, then a `crop` square.

    `flip=False` turns off the training views' horizontal flip, for datasets where left and right
    are different classes (the synthetic benchmark's enter_left / enter_right). `interpolation` is
    the resize's: the backbone's own (timm's data config says bicubic for most timm models),
    bilinear (the authors' and torchvision's) by default.
    """

    short_side: int = 256
    crop: int = 224
    flip: bool = True
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if not 0 < self.crop <= self.short_side:
            raise ValueError(f"crop ({self.crop}) must be in 1..short_side ({self.short_side})")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}")


# ---------------------------------------------------------------------------------------------
# The sampling rule
# ---------------------------------------------------------------------------------------------


class ShortVideo(ValueError):
    """A video with fewer frames than the sampling rule takes, where repeats were not asked for (the
    authors' rule); the message carries the count, so a worker's reason text can be read back
    (`ShortVideo.frames_in`)."""

    PREFIX = f"a video needs at least {FRAMES} frames, this one has "

    def __init__(self, n_frames: int) -> None:
        super().__init__(f"{self.PREFIX}{n_frames}")
        self.n_frames = n_frames

    @classmethod
    def frames_in(cls, reason: str) -> int | None:
        """The frame count of a ShortVideo's message (as a worker reports it), or None for any other reason."""
        match = re.search(re.escape(cls.PREFIX) + r"(\d+)$", reason.strip())
        return int(match.group(1)) if match else None


def sample_indices(
    n_frames: int,
    train: bool = False,
    rng: np.random.Generator | None = None,
    *,
    repeat_short: bool = False,
) -> list[int]:
    """The 8 frame indices of a video of `n_frames` frames, exactly as the authors' loader picks them.

    Test: int(linspace(1, n-2, 8)), or linspace(0, n-1, 8) when (n-2) - 1 < 8. Train: the ends
    jitter by up to pad = int(min(5, (n-8)/2)) frames (start, end drawn from `rng`, inclusive),
    falling back to 0, n-1 when end - start < 8. n == 8 uses every frame. The authors drop videos
    with n < 8 (ShortVideo); `repeat_short=True` instead spreads 8 indices over the 1..7 frames there
    are, int(linspace(0, n-1, 8)), so frames repeat (7 frames: 0, 0, 1, 2, 3, 4, 5, 6). A video of 8
    frames or more gets the same indices either way.
    """
    if n_frames < 1:
        raise ValueError("no decodable frame")
    if n_frames < FRAMES and not repeat_short:
        raise ShortVideo(n_frames)
    if train and rng is None:
        raise ValueError("training indices are random: pass rng=view_rng(seed, video_id, view)")
    if n_frames == FRAMES:
        return list(range(FRAMES))
    if n_frames < FRAMES:
        start, end = 0, n_frames - 1
    elif train:
        assert rng is not None
        pad = int(min(5, (n_frames - FRAMES) / 2))
        if pad >= 1:
            start = int(rng.integers(0, pad, endpoint=True))
            end = int(rng.integers(n_frames - 1 - pad, n_frames - 1, endpoint=True))
        else:
            start, end = 0, n_frames - 1
    else:
        start, end = 1, n_frames - 2
    if n_frames >= FRAMES and end - start < FRAMES:
        start, end = 0, n_frames - 1
    return [int(f) for f in np.linspace(start, end, num=FRAMES)]


def view_rng(seed: int, video_id: str, view: int) -> np.random.Generator:
    """The generator behind every random choice of one view (temporal jitter, crop, flip).

    Seeded from a stable hash of (seed, video_id, view) - never Python's salted hash() - so a view is
    the same in any process, worker count or order.
    """
    digest = hashlib.blake2b(f"{seed}\x1f{video_id}\x1f{view}".encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def resize_short_side(frames: torch.Tensor, spec: ViewSpec = ViewSpec()) -> torch.Tensor:
    """uint8 [T, 3, H, W] -> shorter side `spec.short_side`, with `spec.interpolation` and antialiasing
    (as PIL's Resize)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    mode = InterpolationMode(spec.interpolation)
    return F.resize(frames, [spec.short_side], interpolation=mode, antialias=True)


@dataclass(frozen=True)
class Crop:
    """Where a view's square sits in the resized frames, and whether it is mirrored."""

    top: int
    left: int
    size: int
    flip: bool

    def apply(self, frames: torch.Tensor) -> torch.Tensor:
        """[..., H, W] -> [..., size, size]; a view unless flipped."""
        square = frames[..., self.top : self.top + self.size, self.left : self.left + self.size]
        return square.flip(-1) if self.flip else square


def draw_crop(
    height: int, width: int, train: bool, rng: np.random.Generator | None, spec: ViewSpec = ViewSpec()
) -> Crop:
    """The centre square (test), or one random square then one horizontal flip (p = 0.5), drawn from
    `rng` in that order (train); one Crop is shared by all 8 frames of a view, as the authors do."""
    if not train:  # torchvision's center_crop rounding
        return Crop(int(round((height - spec.crop) / 2.0)), int(round((width - spec.crop) / 2.0)), spec.crop, False)
    if rng is None:
        raise ValueError("a training view is random: pass rng=view_rng(seed, video_id, view)")
    top = int(rng.integers(0, height - spec.crop, endpoint=True))
    left = int(rng.integers(0, width - spec.crop, endpoint=True))
    flip = bool(rng.random() < 0.5)  # drawn even when unused: the crops stay the same either way
    return Crop(top, left, spec.crop, flip and spec.flip)


def crop_view(
    frames: torch.Tensor, train: bool, rng: np.random.Generator | None, spec: ViewSpec = ViewSpec()
) -> torch.Tensor:
    """Resized frames [T, 3, H, W] -> [T, 3, crop, crop]: draw_crop, then apply it to every frame."""
    return draw_crop(frames.shape[-2], frames.shape[-1], train, rng, spec).apply(frames)


def transform_view(
    frames: torch.Tensor, train: bool, rng: np.random.Generator | None, spec: ViewSpec = ViewSpec()
) -> torch.Tensor:
    """Frames uint8 [T, 3, H, W] -> [T, 3, crop, crop] (contiguous): resize_short_side, then crop_view."""
    return crop_view(resize_short_side(frames, spec), train, rng, spec).contiguous()


def load_views(
    path: Path | str,
    n_frames: int,
    video_id: str,
    views: Sequence[int],
    seed: int,
    spec: ViewSpec = ViewSpec(),
    *,
    repeat_short: bool = False,
) -> torch.Tensor:
    """Several views of one video, uint8 [len(views), 8, 3, crop, crop], from ONE decode.

    The union of the views' frames is decoded and resized once (views share most frames); each
    view is then exactly what load_view gives: view 0 is the test view, views >= 1 training views.
    `n_frames` is the manifest's true count (count_frames).
    """
    if not views or min(views) < 0:
        raise ValueError(f"views must be a non-empty list of ints >= 0, got {list(views)}")
    plans = []
    for view in views:
        rng = view_rng(seed, video_id, view)
        plans.append((view > 0, rng, sample_indices(n_frames, train=view > 0, rng=rng, repeat_short=repeat_short)))
    union = sorted({i for _, _, indices in plans for i in indices})
    frames = resize_short_side(decode_frames(path, union), spec)  # decoders give NHWC-strided frames: kept
    position = {index: k for k, index in enumerate(union)}
    out = torch.empty((len(plans), FRAMES, 3, spec.crop, spec.crop), dtype=torch.uint8)
    for k, (train, rng, indices) in enumerate(plans):
        crop = draw_crop(frames.shape[-2], frames.shape[-1], train, rng, spec)
        for j, index in enumerate(indices):
            out[k, j] = crop.apply(frames[position[index]])  # the one copy of each frame
    return out


def load_view(
    path: Path | str,
    n_frames: int,
    video_id: str,
    view: int,
    seed: int,
    spec: ViewSpec = ViewSpec(),
    *,
    repeat_short: bool = False,
) -> torch.Tensor:
    """One view of a video, uint8 [8, 3, crop, crop]: view 0 is the test view, views >= 1 training views.

    The single implementation used by both feature extraction and fine-tuning (see load_views).
    """
    return load_views(path, n_frames, video_id, [view], seed, spec, repeat_short=repeat_short)[0]


def load_window(path: Path | str, first: int, count: int, spec: ViewSpec = ViewSpec()) -> torch.Tensor:
    """The test view of frames first .. first+count-1 of a video (a window of a long recording, or a
    person's whole clip), uint8 [8, 3, crop, crop]: the test rule (sample_indices) applied to the
    window as if it were a video of `count` frames, frames repeated when it has fewer than 8.
    load_window(path, 0, n) is load_view's view 0 of an n-frame video (n >= 8)."""
    indices = [first + i for i in sample_indices(count, repeat_short=True)]
    frames = resize_short_side(decode_frames(path, sorted(set(indices))), spec)
    position = {index: k for k, index in enumerate(sorted(set(indices)))}
    crop = draw_crop(frames.shape[-2], frames.shape[-1], False, None, spec)
    return torch.stack([crop.apply(frames[position[i]]) for i in indices])


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


@functools.cache
def _torchcodec_decoder() -> type | None:
    """torchcodec's VideoDecoder, or None (warned once) when its FFmpeg libraries cannot load."""
    try:
        from torchcodec.decoders import VideoDecoder
    except Exception as exc:  # ImportError, or RuntimeError/OSError when no FFmpeg libs are found
        warnings.warn(
            f"torchcodec cannot load ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "decoding videos with PyAV instead",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return VideoDecoder


def decoder_name() -> str:
    """The decoder in use: "torchcodec", or "pyav" when forced by STRM_DECODER or as the fallback."""
    requested = os.environ.get(DECODER_ENV, "auto").strip().lower() or "auto"
    if requested not in DECODERS:
        raise ValueError(f"{DECODER_ENV}={requested!r}: expected one of {', '.join(DECODERS)}")
    if requested == "pyav":
        return "pyav"
    if _torchcodec_decoder() is not None:
        return "torchcodec"
    if requested == "torchcodec":
        raise RuntimeError(f"{DECODER_ENV}=torchcodec but torchcodec cannot load FFmpeg's libraries")
    return "pyav"


def decode_frames(path: Path | str, indices: Sequence[int]) -> torch.Tensor:
    """uint8 RGB frames [len(indices), 3, H, W] at the video's own size, in the order asked.

    Only the frames asked for are decoded (plus what the codec needs to reach them); repeats are
    decoded once. Raises VideoError naming the file and the reason when the file cannot give them.
    """
    wanted = [int(i) for i in indices]
    if not wanted:
        raise ValueError("decode_frames needs at least one frame index")
    if min(wanted) < 0:
        raise ValueError(f"frame indices must be >= 0, got {min(wanted)}")
    _check_file(path)
    unique = sorted(set(wanted))
    if decoder_name() == "torchcodec":
        frames = _decode_torchcodec(path, unique)
    else:
        frames = _decode_pyav(path, unique)
    if wanted == unique:
        return frames
    position = {index: k for k, index in enumerate(unique)}
    return frames[[position[i] for i in wanted]]


def count_frames(path: Path | str) -> int:
    """The true number of decodable frames (display order, from the start).

    Never trusts the container's header: torchcodec scans the packets, then the last frame is
    decoded to prove the index; when it is not decodable (truncated file) the frames are decoded
    in order until the first failure. The PyAV fallback decodes in order and counts.
    """
    _check_file(path)
    if decoder_name() == "torchcodec":
        return _count_torchcodec(path)
    return sum(1 for _ in _pyav_frames(path, stop=None))


def frame_rate(path: Path | str) -> float:
    """Frames per second of the video stream (the container's average rate); times come from frame_times."""
    _check_file(path)
    if decoder_name() == "torchcodec":
        rate = _open_torchcodec(path).metadata.average_fps
    else:
        import av

        try:
            with av.open(str(path), metadata_errors="ignore") as container:
                if not container.streams.video:
                    raise VideoError(path, "no video stream")
                rate = container.streams.video[0].average_rate
        except av.FFmpegError as exc:
            raise VideoError(path, f"cannot open: {_reason(exc, path)}") from None
    if not rate or float(rate) <= 0:
        raise VideoError(path, "the container gives no frame rate")
    return float(rate)


def frame_times(path: Path | str, n_frames: int | None = None) -> list[float]:
    """Each frame's presentation time in seconds, in display order, from the first frame's (0.0).

    The container's own timestamps (the pts both decoders give; a phone's variable frame rate
    included), read from the packets without decoding. With `n_frames` (the decodable count,
    count_frames) the list has exactly that length: frames past the last timestamp, or a file
    without timestamps, get the average rate's spacing.
    """
    import av

    _check_file(path)
    stamps: list[float] = []
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            if not container.streams.video:
                raise VideoError(path, "no video stream")
            stream = container.streams.video[0]
            base, rate = stream.time_base, stream.average_rate
            try:
                for packet in container.demux(stream):
                    if packet.size and packet.pts is not None and not packet.is_discard:
                        stamps.append(float(packet.pts * base))
            except av.FFmpegError:
                pass  # a truncated tail: the timestamps before it are what exists
    except av.FFmpegError as exc:
        raise VideoError(path, f"cannot open: {_reason(exc, path)}") from None
    stamps.sort()
    times = [t - stamps[0] for t in stamps] if stamps else []
    count = len(times) if n_frames is None else n_frames
    if len(times) >= count:
        return times[:count]
    step = (
        float(1 / rate) if rate and float(rate) > 0 else (float(np.median(np.diff(times))) if len(times) > 1 else 0.04)
    )
    start = times[-1] + step if times else 0.0
    return times + [start + k * step for k in range(count - len(times))]


def _check_file(path: Path | str) -> None:
    """Reasons a path cannot be a video, found without opening a decoder."""
    p = Path(path)
    if not p.exists():
        raise VideoError(path, "no such file")
    if not p.is_file():
        raise VideoError(path, "not a file")
    if p.stat().st_size == 0:
        raise VideoError(path, "empty file (0 bytes)")


def _reason(exc: BaseException, path: Path | str) -> str:
    """A decoder's exception as a short reason: no C++ source locations, no repeated path."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "video stream" in text.lower():
        return "no video stream"
    text = re.sub(r"^.*?\.cpp:\d+, ", "", text).replace("Could not open input file:", "")
    text = re.sub(r"^\[Errno -?\d+\] ", "", text)
    for variant in (f": '{path}'", f"'{path}'", str(path)):
        text = text.replace(variant, "")
    return re.sub(r"\s+", " ", text).strip(" :,") or type(exc).__name__


def _open_torchcodec(path: Path | str):  # -> torchcodec.decoders.VideoDecoder (imported lazily)
    decoder_cls = _torchcodec_decoder()
    assert decoder_cls is not None
    try:
        # exact: frame i is found from a scan of the packets, not guessed from fps and duration.
        return decoder_cls(str(path), seek_mode="exact", dimension_order="NCHW", num_ffmpeg_threads=1)
    except Exception as exc:  # any failure to open is this file's failure
        raise VideoError(path, f"cannot open: {_reason(exc, path)}") from None


def _decode_torchcodec(path: Path | str, unique: list[int]) -> torch.Tensor:
    decoder = _open_torchcodec(path)
    n = decoder.metadata.num_frames
    if n is not None and unique[-1] >= n:
        raise VideoError(path, f"frame {unique[-1]} asked, the video has {n} frames")
    try:
        return decoder.get_frames_at(unique).data
    except Exception:  # a damaged stretch: decoding in order gets every frame that exists
        return _decode_pyav(path, unique)


def _count_torchcodec(path: Path | str) -> int:
    decoder = _open_torchcodec(path)
    n = decoder.metadata.num_frames or 0
    if n == 0:
        return 0
    try:
        decoder.get_frame_at(n - 1)
        return n
    except Exception:  # the index over-reports (truncated file): count what decodes in order,
        return sum(1 for _ in _pyav_frames(path, stop=None))  # the same count as the fallback gives


def _pyav_frames(path: Path | str, stop: int | None) -> Iterator[av.VideoFrame]:
    """Decoded frames in display order, up to index `stop` (inclusive); ends at the first decode error."""
    import av

    try:
        container = av.open(str(path), metadata_errors="ignore")
    except Exception as exc:
        raise VideoError(path, f"cannot open: {_reason(exc, path)}") from None
    with container:
        if not container.streams.video:
            raise VideoError(path, "no video stream")
        stream = container.streams.video[0]
        stream.thread_count = 1  # parallelism comes from worker processes
        index = 0
        try:
            for frame in container.decode(stream):
                yield frame
                if stop is not None and index >= stop:
                    return
                index += 1
        except av.FFmpegError:
            return  # a truncated or corrupt tail: the frames before it are what exists


def iter_frames(path: Path | str) -> Iterator[tuple[np.ndarray, float]]:
    """Every decodable frame in display order, RGB uint8 [H, W, 3], with its time in seconds from the
    first frame's: a video rewritten frame by frame (predict's annotated video) keeps count and timing."""
    from av.video.reformatter import VideoReformatter

    _check_file(path)
    to_rgb = VideoReformatter()  # one conversion context for all frames (a new one per frame costs more)
    first: float | None = None
    last, step = 0.0, 1 / 30  # a frame without a timestamp follows the last one by the last spacing seen
    for frame in _pyav_frames(path, stop=None):
        time = frame.time if frame.time is not None else last + step
        first, step = (time, step) if first is None else (first, time - last if time > last else step)
        last = time
        yield to_rgb.reformat(frame, format="rgb24").to_ndarray(), time - first


def _decode_pyav(path: Path | str, unique: list[int]) -> torch.Tensor:
    wanted = set(unique)
    frames: list[torch.Tensor] = []
    decoded = 0
    for index, frame in enumerate(_pyav_frames(path, stop=unique[-1])):
        decoded = index + 1
        if index in wanted:
            frames.append(torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1))
    if len(frames) < len(unique):
        raise VideoError(path, f"frame {unique[-1]} asked, only {decoded} frames decode")
    return torch.stack(frames)
