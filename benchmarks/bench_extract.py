"""Extraction throughput versus the backbone alone, in the same run.

The pipeline side is the real `pipeline.features.extract.extract` (decoding in worker processes, resize and
crop, backbone, max pooling, Zarr writes) on H.264 videos of a photo panning at 320 x 240 (the
size of HMDB51/UCF101 clips). The backbone side is the same backbone, batch size and memory
format on preloaded, normalised tensors, measured before and after the pipeline and averaged, as
the CPU is shared. The ratio uses the pipeline's steady state (first to last finished video):
worker start-up is paid once per run, which a real dataset of thousands of videos amortises; the
ratio including it is in the details.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import skimage.data
import torch

from benchmarks import Figure
from pipeline.data.synth import write_mp4
from pipeline.data.video import ViewSpec
from pipeline.features.backbones import get_backbone
from pipeline.features.extract import ExtractSettings, RunOptions, extract

GOAL = ">= 0.8"
SIZE = (240, 320)  # H, W
FRAMES_PER_VIDEO = 48


def _panning_video(path: Path, shift: int) -> None:
    """A camera pan over skimage's astronaut photo: real texture, so the codec does real work."""
    photo = skimage.data.astronaut()  # 512 x 512 x 3
    h, w = SIZE
    frames = np.stack(
        [photo[(shift + 2 * t) % (512 - h) :][:h, (3 * t) % (512 - w) :][:, :w] for t in range(FRAMES_PER_VIDEO)]
    )
    write_mp4(np.ascontiguousarray(frames), path)


def _backbone_fps(backbone: torch.nn.Module, batch: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        backbone(batch)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            backbone(batch)
        return repeats * len(batch) / (time.perf_counter() - start)


def _fraction(name: str, *, videos: int, views: int, batch_size: int, workers: int, repeats: int) -> Figure:
    torch.manual_seed(0)
    crop = ViewSpec().crop
    # resnet50, the ViT: random weights, same speed; frames resized as the backbone wants (a ViT: bicubic).
    backbone = get_backbone(name, pretrained=name == "tf_efficientnet_lite0", image_size=crop)
    backbone = backbone.to(memory_format=torch.channels_last)
    settings = ExtractSettings(views=views, spec=ViewSpec(crop=crop, interpolation=backbone.interpolation))
    frames = torch.randint(0, 256, (batch_size, 3, crop, crop), dtype=torch.uint8)
    batch = backbone.prepare(frames).contiguous(memory_format=torch.channels_last)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = []
        for i in range(videos):
            _panning_video(root / f"v{i}.mp4", shift=17 * i)
            rows.append(
                {
                    "video_id": f"c{i % 2}/v{i}",
                    "class": f"c{i % 2}",
                    "split": "train",
                    "path": f"v{i}.mp4",
                    "n_frames": FRAMES_PER_VIDEO,
                    "status": "ok",
                }
            )
        before = _backbone_fps(backbone, batch, repeats)
        stamps: list[tuple[float, int]] = []
        start = time.perf_counter()
        result = extract(
            "bench",
            pd.DataFrame(rows),
            backbone,
            root / "cache",
            settings,
            RunOptions(batch_size=batch_size, workers=workers),
            videos_root=root,
            progress=lambda p: stamps.append((time.perf_counter(), p.frames)),
        )
        wall = time.perf_counter() - start
        after = _backbone_fps(backbone, batch, repeats)
    if result.failures:
        raise RuntimeError(f"benchmark videos failed: {result.failures}")
    alone = (before + after) / 2
    (t0, f0), (t1, f1) = stamps[0], stamps[-1]
    steady = (f1 - f0) / (t1 - t0)
    total = videos * views * 8 / wall
    return Figure(
        value=steady / alone,
        unit="x backbone-alone frames/s",
        goal=GOAL,
        details={
            "backbone alone frames/s (before, after)": f"{before:.2f}, {after:.2f}",
            "extraction frames/s, steady state": f"{steady:.2f}",
            "extraction frames/s incl. worker start-up": f"{total:.2f} (ratio {total / alone:.2f})",
            "setup": f"{videos} videos x {views} views x 8 frames, {SIZE[1]}x{SIZE[0]} H.264 -> 256/224 "
            f"{settings.spec.interpolation}, "
            f"batch {batch_size}, {workers} decoding worker(s), {torch.get_num_threads()} torch threads",
        },
    )


def _videos(root: Path, count: int) -> pd.DataFrame:
    rows = []
    for i in range(count):
        _panning_video(root / f"v{i}.mp4", shift=17 * i)
        row = {"video_id": f"c{i % 2}/v{i}", "class": f"c{i % 2}", "split": "train", "path": f"v{i}.mp4"}
        rows.append({**row, "n_frames": FRAMES_PER_VIDEO, "status": "ok"})
    return pd.DataFrame(rows)


def _fsync_overhead(videos: int = 12, rounds: int = 3) -> Figure:
    """What durability costs extraction: the same extraction with each video's chunk and flag fsynced
    and without, alternated in one run (best of `rounds` each, as the CPU is shared)."""
    torch.manual_seed(0)
    backbone = get_backbone("tf_efficientnet_lite0", pretrained=True).to(memory_format=torch.channels_last)
    settings = ExtractSettings(views=2)
    seconds: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = _videos(root, videos)
        for k in range(2 * rounds):
            durable = k % 2 == 1
            options = RunOptions(batch_size=32, workers=1, durable=durable)
            start = time.perf_counter()
            extract("bench", manifest, backbone, root / f"cache{k}", settings, options, videos_root=root)
            seconds[durable].append(time.perf_counter() - start)
    durable, plain = min(seconds[True]), min(seconds[False])
    return Figure(
        value=durable / plain - 1,
        unit="extra time with fsync",
        goal="<= 0.05",
        details={
            "extraction s, fsync on (each round)": ", ".join(f"{s:.2f}" for s in seconds[True]),
            "extraction s, fsync off (each round)": ", ".join(f"{s:.2f}" for s in seconds[False]),
            "setup": f"{videos} videos x 2 views, Lite0 at 224, 1 decoding worker, cache on {tempfile.gettempdir()}",
        },
    )


BENCHES: dict[str, Callable[[], Figure]] = {
    "extract_fsync_overhead": _fsync_overhead,
    "extract_fraction_of_backbone_lite0": lambda: _fraction(
        "tf_efficientnet_lite0", videos=10, views=2, batch_size=32, workers=1, repeats=3
    ),
    "extract_fraction_of_backbone_resnet50": lambda: _fraction(
        "resnet50", videos=8, views=2, batch_size=32, workers=1, repeats=2
    ),
    "extract_fraction_of_backbone_vit": lambda: _fraction(
        "vit_small_patch14_dinov2", videos=8, views=2, batch_size=32, workers=1, repeats=2
    ),
}
