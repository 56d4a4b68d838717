"""The embedded benchmark: a procedural, Something-Something-like few-shot dataset.

A class is an ordered pair "A then B" of ten primitives (the first half of the clip shows A, the
second half B), so "A then B" and "B then A" are two classes built from the same kind of frames
in another order: only temporal reasoning separates them. Every primitive changes what the 4x4
feature patches contain (visibility, size, colour, coverage, presence), not only where the object
is, because pure translations inside the frame vanish under patch pooling. A static distractor
photo and a one-frame jitter of the boundary between A and B keep the task from saturating.
data_manifests/synthetic.md explains the design and the measured figures.

Everything is a pure function of (seed, class, video index): the same seed gives the same
decoded frames. Videos are real H.264 MP4 files written with PyAV, laid out
`root/<class>/<class>_<index>.mp4` like HMDB51.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import av
import numpy as np
from PIL import Image

from pipeline.runtime.workers import imap_isolated

GENERATOR_VERSION = "1"  # bump whenever a change alters the frames of an existing (seed, class, index)

PRIMITIVES: tuple[str, ...] = (
    "appear",  # fade in
    "disappear",  # fade out
    "grow",  # to about 1.9x
    "shrink",  # to about 0.15x
    "enter_left",  # from fully outside on the left to its place
    "enter_right",
    "exit_left",  # from its place to fully outside on the left
    "exit_right",
    "cover",  # a striped curtain slides down over the frame
    "recolour",  # fade to the colour-inverted object
)
CLASSES: tuple[str, ...] = tuple(f"{a}_then_{b}" for a in PRIMITIVES for b in PRIMITIVES)

SPLIT_SEED = 0
SPLIT_SIZES: dict[str, int] = {"train": 64, "val": 12, "test": 24}  # the SSv2/Kinetics 64/12/24 protocol

# Object sources: (skimage.data function, square crop box (row, col, side)) around something recognisable.
PHOTOS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("astronaut", (20, 140, 190)),  # face
    ("coffee", (10, 110, 360)),  # cup
    ("chelsea", (0, 80, 300)),  # cat's face
    ("rocket", (60, 170, 300)),
    ("coins", (20, 40, 260)),
    ("hubble_deep_field", (100, 100, 500)),
    ("immunohistochemistry", (200, 150, 300)),
    ("retina", (200, 200, 1000)),
    ("colorwheel", (0, 0, 370)),
    ("logo", (0, 0, 500)),
    ("camera", (40, 150, 300)),  # head and camera
)

VIDEO_SUFFIX = ".mp4"
INFO_FILE = "synth.json"


class SynthError(ValueError):
    """An output folder that cannot be resumed with these settings (message names the file)."""


@dataclass(frozen=True)
class SynthSpec:
    """Frame geometry and encoding. Object sizes are stated on the `view` (the centre crop a model
    sees after resizing the shorter side to `size`), which here is pixel-for-pixel the frame's centre."""

    size: int = 128  # frame side (pixels)
    view: int = 112  # centre crop side that the sizes below refer to
    fps: int = 12
    min_frames: int = 16
    max_frames: int = 32
    object_min: int = 44
    object_max: int = 72
    centre_jitter: int = 12  # object centre within this many pixels of the frame centre
    distractor_min: int = 18
    distractor_max: int = 26
    grow_to: float = 1.9
    shrink_to: float = 0.15
    crf: int = 18


@dataclass(frozen=True)
class Scene:
    """Everything in a video that does not depend on the primitives."""

    background: np.ndarray  # float32 [H, W, 3] in 0..1, with the distractor already pasted in
    photo: Image.Image  # RGB crop of the object at a resolution that survives growing
    side: int  # object side in its normal state (pixels)
    centre: tuple[float, float]  # (row, col) of the object centre in its normal state
    circle: bool  # circle mask, else square
    curtain: tuple[np.ndarray, np.ndarray, int]  # the two stripe colours and the stripe width
    frame_size: int


@dataclass(frozen=True)
class State:
    """The object's condition in one frame; the defaults are its normal state."""

    alpha: float = 1.0
    scale: float = 1.0
    dx: float = 0.0  # horizontal offset of the centre (pixels)
    invert: float = 0.0  # 0 = own colours, 1 = colour-inverted
    cover: float = 0.0  # fraction of the frame height under the curtain


@dataclass(frozen=True)
class Clip:
    """The random draws of one video besides its scene: length, boundary and both progress ranges."""

    n_frames: int
    boundary: int  # first frame of the second primitive
    first: tuple[float, float]  # progress range of the first primitive
    second: tuple[float, float]


@dataclass(frozen=True)
class SynthResult:
    """What `generate` did: videos written now and videos found complete from an earlier run."""

    written: int
    skipped: int
    failed: tuple[tuple[str, str], ...] = ()  # (path, reason)


def parse_class(name: str) -> tuple[str, str]:
    """'grow_then_exit_left' -> ('grow', 'exit_left'); ValueError for a name that is not a class."""
    first, sep, second = name.partition("_then_")
    if not sep or first not in PRIMITIVES or second not in PRIMITIVES:
        raise ValueError(f"not a synthetic class: {name!r} (expected '<A>_then_<B>' with A, B in {PRIMITIVES})")
    return first, second


def class_split(seed: int = SPLIT_SEED) -> dict[str, str]:
    """Class -> 'train'/'val'/'test', 64/12/24 from a fixed permutation (data_manifests/synthetic.csv records it)."""
    order = np.random.default_rng(seed).permutation(len(CLASSES))
    split: dict[str, str] = {}
    start = 0
    for name, count in SPLIT_SIZES.items():
        for i in order[start : start + count]:
            split[CLASSES[i]] = name
        start += count
    return {c: split[c] for c in CLASSES}


def class_subset(count: int, way: int, seed: int = SPLIT_SEED) -> dict[str, str]:
    """A smaller benchmark of `count` classes -> split: the first classes of each split of `class_split`
    (so its videos are the full benchmark's), in about its 64/12/24 shares, every split at least `way`
    classes (a task's). All 100 give `class_split` itself."""
    if not 3 * way <= count <= len(CLASSES):
        raise ValueError(f"classes: {count}, expected {3 * way} to {len(CLASSES)} (each split needs {way} for a task)")
    sizes = {name: max(way, round(count * n / len(CLASSES))) for name, n in SPLIT_SIZES.items() if name != "train"}
    sizes["train"] = count - sum(sizes.values())
    full = class_split(seed)
    order = np.random.default_rng(seed).permutation(len(CLASSES))  # class_split's order
    chosen: dict[str, str] = {}
    for name, size in sizes.items():
        members = [CLASSES[i] for i in order if full[CLASSES[i]] == name]
        chosen.update(dict.fromkeys(members[:size], name))
    return {c: chosen[c] for c in CLASSES if c in chosen}


def video_path(root: Path, class_name: str, index: int) -> Path:
    """Where video `index` of a class lives: root/<class>/<class>_<index>.mp4."""
    return Path(root) / class_name / f"{class_name}_{index:03d}{VIDEO_SUFFIX}"


def video_rng(seed: int, class_name: str, index: int) -> np.random.Generator:
    """The only source of a video's randomness: keyed by seed, class position and index."""
    return np.random.default_rng([seed, CLASSES.index(class_name), index])


@cache
def _photograph(name: str) -> np.ndarray:
    """A bundled scikit-image photograph as uint8 RGB (grey expanded, RGBA flattened on white)."""
    import skimage.data

    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.shape[2] == 4:
        alpha = image[..., 3:4].astype(np.float32) / 255
        image = (image[..., :3] * alpha + 255 * (1 - alpha)).round().astype(np.uint8)
    return image


def _photo_crop(rng: np.random.Generator, photo: int, out_side: int) -> Image.Image:
    """A jittered square crop (+-8% shift, +-10% size) of one photograph, resized to out_side."""
    name, (row, col, side) = PHOTOS[photo]
    image = _photograph(name)
    height, width = image.shape[:2]
    side_j = int(min(side * rng.uniform(0.9, 1.1), height, width))
    row_j = int(np.clip(row + (side - side_j) / 2 + rng.uniform(-0.08, 0.08) * side, 0, height - side_j))
    col_j = int(np.clip(col + (side - side_j) / 2 + rng.uniform(-0.08, 0.08) * side, 0, width - side_j))
    crop = Image.fromarray(image[row_j : row_j + side_j, col_j : col_j + side_j])
    return crop.resize((out_side, out_side), Image.Resampling.BILINEAR)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A plain random colour with a linear gradient in a random direction and low-contrast blocky noise."""
    colour = rng.uniform(0.15, 0.85, size=3)
    angle = rng.uniform(0, 2 * math.pi)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) - 0.5
    ramp = rows * math.sin(angle) + cols * math.cos(angle)  # in about [-0.7, 0.7]
    block = int(rng.choice([8, 16]))
    noise = rng.uniform(-0.04, 0.04, size=(size // block, size // block, 1))
    noise = np.repeat(np.repeat(noise, block, axis=0), block, axis=1)
    image = colour[None, None, :] + rng.uniform(0.1, 0.25) * ramp[..., None] + noise
    return np.clip(image, 0, 1).astype(np.float32)


def draw_scene(rng: np.random.Generator, spec: SynthSpec = SynthSpec()) -> Scene:
    """Background, distractor, object photo, size, position, mask and curtain of one video."""
    size = spec.size
    background = _background(rng, size)
    obj, distractor = rng.choice(len(PHOTOS), size=2, replace=False)
    side = int(rng.integers(spec.object_min, spec.object_max + 1))
    photo = _photo_crop(rng, int(obj), math.ceil(side * spec.grow_to) + 2)
    centre = tuple(size / 2 + rng.uniform(-spec.centre_jitter, spec.centre_jitter, size=2))
    circle = bool(rng.integers(2))
    # The distractor sits static in a random corner of the view (the centre crop a model sees).
    d_side = int(rng.integers(spec.distractor_min, spec.distractor_max + 1))
    margin = (size - spec.view) // 2 + int(rng.integers(2, 7))
    corner_r, corner_c = rng.integers(2, size=2)
    top = margin if corner_r == 0 else size - margin - d_side
    left = margin if corner_c == 0 else size - margin - d_side
    d_image = np.asarray(_photo_crop(rng, int(distractor), d_side), dtype=np.float32) / 255
    background[top : top + d_side, left : left + d_side] = d_image
    curtain = (rng.uniform(0, 1, size=3), rng.uniform(0, 1, size=3), int(rng.integers(5, 11)))
    return Scene(background, photo, side, centre, circle, curtain, size)


def primitive_state(primitive: str, progress: float, scene: Scene, spec: SynthSpec = SynthSpec()) -> State:
    """The object's state at `progress` (0..1) through a primitive, starting from its normal state."""
    t = float(progress)
    half = scene.side / 2
    out_left = -(scene.centre[1] + half + 1)  # offset that puts the object fully left of the frame
    out_right = scene.frame_size - scene.centre[1] + half + 1
    if primitive == "appear":
        return State(alpha=t)
    if primitive == "disappear":
        return State(alpha=1 - t)
    if primitive == "grow":
        return State(scale=1 + (spec.grow_to - 1) * t)
    if primitive == "shrink":
        return State(scale=1 - (1 - spec.shrink_to) * t)
    if primitive == "enter_left":
        return State(dx=(1 - t) * out_left)
    if primitive == "enter_right":
        return State(dx=(1 - t) * out_right)
    if primitive == "exit_left":
        return State(dx=t * out_left)
    if primitive == "exit_right":
        return State(dx=t * out_right)
    if primitive == "cover":
        return State(cover=t)
    if primitive == "recolour":
        return State(invert=t)
    raise ValueError(f"unknown primitive {primitive!r}; expected one of {PRIMITIVES}")


def _mask(side: int, circle: bool) -> np.ndarray:
    """Anti-aliased circle (or full square) alpha mask, float32 [side, side]."""
    if not circle:
        return np.ones((side, side), np.float32)
    centre = (side - 1) / 2
    rows, cols = np.mgrid[0:side, 0:side]
    distance = np.hypot(rows - centre, cols - centre)
    return np.clip(side / 2 - distance + 0.5, 0, 1).astype(np.float32)


def render_frame(scene: Scene, state: State) -> np.ndarray:
    """One uint8 [H, W, 3] frame: background, then the object, then the curtain."""
    frame = scene.background.copy()
    size = scene.frame_size
    side = max(1, round(scene.side * state.scale))
    if state.alpha > 0:
        obj = np.asarray(scene.photo.resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32) / 255
        if state.invert > 0:
            obj = obj * (1 - state.invert) + (1 - obj) * state.invert
        alpha = _mask(side, scene.circle)[..., None] * state.alpha
        top = round(scene.centre[0] - side / 2)
        left = round(scene.centre[1] + state.dx - side / 2)
        r0, r1 = max(top, 0), min(top + side, size)
        c0, c1 = max(left, 0), min(left + side, size)
        if r0 < r1 and c0 < c1:
            o = (slice(r0 - top, r1 - top), slice(c0 - left, c1 - left))
            region = frame[r0:r1, c0:c1]
            frame[r0:r1, c0:c1] = region * (1 - alpha[o]) + obj[o] * alpha[o]
    if state.cover > 0:
        edge = round(state.cover * size)  # the curtain's lower edge; its stripes move with it
        first, second, width = scene.curtain
        stripe = ((edge - 1 - np.arange(edge)) // width) % 2
        frame[:edge] = np.where(stripe[:, None, None] == 0, first, second)
    return (frame * 255).round().clip(0, 255).astype(np.uint8)


def render_segment(
    scene: Scene, primitive: str, progress: Iterable[float], spec: SynthSpec = SynthSpec()
) -> np.ndarray:
    """Frames [T, H, W, 3] of one primitive at the given progress values."""
    frames = [render_frame(scene, primitive_state(primitive, p, scene, spec)) for p in progress]
    return np.stack(frames) if frames else np.zeros((0, scene.frame_size, scene.frame_size, 3), np.uint8)


def draw_clip(rng: np.random.Generator, spec: SynthSpec = SynthSpec()) -> Clip:
    """Length in [min_frames, max_frames], the A/B boundary at the middle +-1 frame, and each
    primitive's progress running from a point in [0, 0.15] to one in [0.85, 1]."""
    n = int(rng.integers(spec.min_frames, spec.max_frames + 1))
    boundary = n // 2 + int(rng.integers(-1, 2))
    first = (float(rng.uniform(0, 0.15)), float(rng.uniform(0.85, 1)))
    second = (float(rng.uniform(0, 0.15)), float(rng.uniform(0.85, 1)))
    return Clip(n, boundary, first, second)


def render_clip(scene: Scene, first: str, second: str, clip: Clip, spec: SynthSpec = SynthSpec()) -> np.ndarray:
    """Frames [n, H, W, 3] of "first then second"."""
    a = render_segment(scene, first, np.linspace(*clip.first, clip.boundary), spec)
    b = render_segment(scene, second, np.linspace(*clip.second, clip.n_frames - clip.boundary), spec)
    return np.concatenate([a, b])


def render_video(class_name: str, index: int, seed: int = 0, spec: SynthSpec = SynthSpec()) -> np.ndarray:
    """The frames uint8 [n, H, W, 3] of video `index` of a class: a pure function of its arguments."""
    first, second = parse_class(class_name)
    rng = video_rng(seed, class_name, index)
    scene = draw_scene(rng, spec)
    clip = draw_clip(rng, spec)
    return render_clip(scene, first, second, clip, spec)


def write_mp4(frames: np.ndarray, path: Path, fps: int = 12, crf: int = 18) -> None:
    """Encode uint8 [n, H, W, 3] frames as H.264 (yuv420p) in an MP4 container at `path`.

    One encoder thread: the CPUs are shared between generator processes, and x264 output then
    does not depend on the machine's core count.
    """
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": str(crf), "preset": "medium"})
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))


def write_video(root: Path, class_name: str, index: int, seed: int, spec: SynthSpec = SynthSpec()) -> Path:
    """Render and write one video; atomic (a temporary file renamed), so a present file is complete."""
    path = video_path(root, class_name, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    write_mp4(render_video(class_name, index, seed, spec), partial, spec.fps, spec.crf)
    os.replace(partial, path)
    return path


def _write_job(job: tuple[str, str, int, int, SynthSpec]) -> str:
    """Top-level (picklable) worker entry point."""
    root, class_name, index, seed, spec = job
    return str(write_video(Path(root), class_name, index, seed, spec))


def _check_info(out: Path, seed: int, spec: SynthSpec) -> None:
    """Record seed, version and spec in out/synth.json; refuse to mix videos of other settings."""
    info = {"generator": GENERATOR_VERSION, "seed": seed, "spec": asdict(spec)}
    path = out / INFO_FILE
    if path.exists():
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise SynthError(f"{path}: unreadable ({err}); remove it or choose another output folder") from err
        if found != info:
            changed = "; ".join(f"{k}: found {found.get(k)}, asked {v}" for k, v in info.items() if found.get(k) != v)
            raise SynthError(
                f"{path}: this folder holds videos of other settings ({changed}); choose another output folder"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2) + "\n")


def generate(
    out: Path,
    videos_per_class: int = 30,
    seed: int = 0,
    workers: int = 1,
    classes: Sequence[str] | None = None,
    spec: SynthSpec = SynthSpec(),
    progress: Callable[[int], None] | None = None,
) -> SynthResult:
    """Write videos 0..videos_per_class-1 of each class (all 100 by default) under `out`.

    Resumable: a video whose file exists is complete (files are renamed into place) and is
    skipped. `progress(k)` is called with the number of videos just finished or skipped.
    Raises SynthError when `out` holds videos of another seed, spec or generator version.
    """
    out = Path(out)
    classes = CLASSES if classes is None else tuple(classes)
    for name in classes:
        parse_class(name)
    if videos_per_class < 1 or workers < 1:
        raise ValueError(f"videos_per_class and workers must be >= 1 (got {videos_per_class}, {workers})")
    _check_info(out, seed, spec)
    todo = [(str(out), c, i, seed, spec) for c in classes for i in range(videos_per_class)]
    missing = [job for job in todo if not video_path(out, job[1], job[2]).exists()]
    skipped = len(todo) - len(missing)
    if progress and skipped:
        progress(skipped)
    failed: list[tuple[str, str]] = []
    if workers == 1 or len(missing) <= 1:
        for job in missing:
            try:
                _write_job(job)
            except (OSError, av.FFmpegError) as err:
                failed.append((str(video_path(out, job[1], job[2])), str(err)))
            if progress:
                progress(1)
    else:
        for job, _, error in imap_isolated(_write_job, missing, workers):
            if error is not None:
                failed.append((str(video_path(out, job[1], job[2])), error))
            if progress:
                progress(1)
    return SynthResult(written=len(missing) - len(failed), skipped=skipped, failed=tuple(failed))
