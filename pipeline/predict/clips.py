"""A person's clips as features: finding videos and action folders, probing them, cutting recordings
into windows, and making features with exactly the recipe a checkpoint was trained on (FeatureMaker).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch

from pipeline.data.manifests import VIDEO_SUFFIXES
from pipeline.data.video import (
    FRAMES,
    SAMPLING_RULE_VERSION,
    VideoError,
    ViewSpec,
    count_frames,
    frame_rate,
)
from pipeline.features.backbones import Backbone, get_backbone
from pipeline.features.cache import FeatureRecipe
from pipeline.features.extract import RunOptions, VideoJob, run_jobs
from pipeline.runtime.workers import imap_isolated
from pipeline.training.checkpoints import (
    CheckpointError,
    load_backbone_weights,
)

PROTO = "proto"


class PredictError(ValueError):
    """A checkpoint, support set, weights file or option that cannot be used; the message names it and why."""


# ---------------------------------------------------------------------------------------------- files


def find_videos(paths: Iterable[Path | str]) -> list[Path]:
    """Files as given (any name), folders searched recursively for video files, in sorted order."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
        else:
            found.append(path)
    return found


def support_folder(folder: Path) -> list[tuple[Path, str]]:
    """(clip, action) for every video under SUPPORT/<action>/, actions in sorted order."""
    if not folder.is_dir():
        raise PredictError(f"{folder}: no such support folder (expected SUPPORT/<action>/<clip>) or support index")
    actions = sorted(p for p in folder.iterdir() if p.is_dir())
    clips = [(clip, action.name) for action in actions for clip in find_videos([action])]
    empty = [a.name for a in actions if not any(name == a.name for _, name in clips)]
    if empty:
        raise PredictError(f"{folder}: action folder(s) {', '.join(empty)} hold no video files")
    if len(actions) < 2:
        raise PredictError(f"{folder}: {len(actions)} action folder(s); a support set needs at least 2 actions")
    return clips


# ---------------------------------------------------------------------------------------------- features


def probe_video(path: str) -> tuple[int, float]:
    """(decodable frames, frames per second) of a video; runs in a worker process (a decoder may crash)."""
    return count_frames(path), frame_rate(path)


def window_starts(frames: int, fps: float, window_s: float, stride_s: float) -> list[tuple[int, int]]:
    """(first frame, frame count) of each window [t, t + window) for t = 0, stride, 2 stride, ..., plus one
    window ending at the last frame when the stride leaves a tail, so every frame is classified; a video
    shorter than one window is one window of all its frames."""
    width = max(1, round(window_s * fps))
    step = max(1, round(stride_s * fps))
    if frames <= width:
        return [(0, frames)]
    firsts = list(range(0, frames - width + 1, step))
    if firsts[-1] + width < frames:
        firsts.append(frames - width)
    return [(first, width) for first in firsts]


@dataclass
class FeatureMaker:
    """The checkpoint's feature recipe, rebuilt: clips and windows of clips -> [L, P*P, D] float16 features."""

    recipe: FeatureRecipe
    backbone: Backbone
    device: torch.device
    batch_size: int = 64
    workers: int = 2

    @property
    def spec(self) -> ViewSpec:
        return self.recipe.view_spec()

    def run(self, jobs: list[VideoJob], progress: Callable[[int], None] | None = None) -> dict[int, torch.Tensor | str]:
        """job index -> features [L, P*P, D] or the reason it failed (decoding in crash-isolated workers)."""
        results: dict[int, torch.Tensor | str] = {}

        def done(job: VideoJob, features: torch.Tensor, _frames: int) -> None:
            results[job.index] = features[0]
            if progress:
                progress(1)

        def failed(job: VideoJob, reason: str, _frames: int) -> None:
            results[job.index] = _short_reason(reason)
            if progress:
                progress(1)

        options = RunOptions(batch_size=self.batch_size, workers=self.workers, device=str(self.device))
        run_jobs(
            jobs,
            self.backbone,
            normalize=self.recipe.normalize,
            patches=self.recipe.patches,
            options=options,
            device=self.device,
            precision=self.recipe.precision,
            on_features=done,
            on_failure=failed,
        )
        return results

    def clip_jobs(self, paths: Sequence[Path], kind: str) -> list[VideoJob]:
        """One job per clip: its test view (view 0 of the sampling rule), whole."""
        return [VideoJob(kind, k, str(p), str(p), -1, 1, 0, self.spec) for k, p in enumerate(paths)]

    def window_jobs(
        self, paths: Sequence[Path], window_s: float, stride_s: float, first_index: int
    ) -> list[tuple[list[VideoJob], list[tuple[float, float]], str | None]]:
        """Per recording: the jobs of its windows and their (start, end) times in seconds, or the reason it
        has none. The recordings are probed in one pool of crash-isolated workers."""
        out: list[tuple[list[VideoJob], list[tuple[float, float]], str | None]] = []
        for path, probed in zip(paths, _probe([str(p) for p in paths], self.workers), strict=False):
            if isinstance(probed, str):
                out.append(([], [], probed))
                continue
            frames, fps = probed
            starts = window_starts(frames, fps, window_s, stride_s)
            if frames > starts[0][1] and starts[0][1] < FRAMES:
                out.append(
                    (
                        [],
                        [],
                        f"a window of {window_s:g} s is {starts[0][1]} frames at {fps:g} fps; "
                        f"a window needs at least {FRAMES} (--window)",
                    )
                )
                continue
            jobs = [
                VideoJob("window", first_index + k, str(path), str(path), frames, 1, 0, self.spec, window=w)
                for k, w in enumerate(starts)
            ]
            first_index += len(jobs)
            out.append((jobs, [(first / fps, (first + count) / fps) for first, count in starts], None))
        return out


def _short_reason(reason: str) -> str:
    """A decoder's reason without the exception's class name."""
    for prefix in ("VideoError: ", "ValueError: "):
        reason = reason.removeprefix(prefix)
    return reason


def _probe(paths: list[str], workers: int) -> list[tuple[int, float] | str]:
    if workers == 0:
        out: list[tuple[int, float] | str] = []
        for p in paths:
            try:
                out.append(probe_video(p))
            except (VideoError, ValueError, OSError) as err:
                out.append(str(err))
        return out
    results: dict[str, tuple[int, float] | str] = {
        item: (cast(tuple[int, float], value) if error is None else _short_reason(error))  # no error: a result
        for item, value, error in imap_isolated(probe_video, paths, workers=workers)
    }
    return [results[p] for p in paths]


def _weights_backbone(recipe: FeatureRecipe, weights: Path | None, state: dict | None) -> Backbone:
    """The recipe's backbone: from the checkpoint's own state, a --weights file (plain weights or a
    fine-tune checkpoint's backbone), or the pretrained download."""
    if state is not None:
        backbone = get_backbone(recipe.backbone, layer=recipe.layer, pretrained=False, image_size=recipe.crop)
        backbone.load_state_dict(state)
        backbone.weights_id = recipe.weights  # the checkpoint file itself
        return backbone
    if weights is not None and weights.suffix != ".safetensors":
        backbone = get_backbone(recipe.backbone, layer=recipe.layer, pretrained=False, image_size=recipe.crop)
        try:
            return load_backbone_weights(backbone, weights)
        except CheckpointError:
            pass  # not a checkpoint with a backbone: plain weights, which get_backbone reads
    return get_backbone(
        recipe.backbone, weights=weights, layer=recipe.layer, pretrained=weights is None, image_size=recipe.crop
    )


def feature_maker(
    recipe: FeatureRecipe,
    *,
    state: dict | None = None,
    weights: Path | None = None,
    backbone: Backbone | None = None,
    allow_other_weights: bool = False,
    device: torch.device,
    batch_size: int = 64,
    workers: int = 2,
) -> tuple[FeatureMaker, list[str]]:
    """A FeatureMaker for `recipe` (with `backbone` when it is already built), and notes; PredictError when
    the recipe cannot be rebuilt exactly."""
    if recipe.sampling_rule != SAMPLING_RULE_VERSION:
        raise PredictError(
            f"the checkpoint's features used sampling rule {recipe.sampling_rule!r}; this strm samples "
            f"{SAMPLING_RULE_VERSION!r}: re-extract and retrain, or use the strm that made it"
        )
    if recipe.frames != FRAMES:
        raise PredictError(f"the checkpoint's features have L={recipe.frames} frames; this strm samples {FRAMES}")
    backbone = backbone or _weights_backbone(recipe, weights, state)
    notes = []
    if backbone.weights_id != recipe.weights:
        message = (
            f"the backbone weights differ from the ones the heads were trained on "
            f"({backbone.weights_id[:16]} here, {recipe.weights[:16]} recorded)"
        )
        if not allow_other_weights:
            raise PredictError(message + ": pass --weights with the recorded file, or --allow-other-weights")
        notes.append(message + " (--allow-other-weights): predictions may be meaningless")
    if recipe.normalize:  # the recipe's own statistics, whatever the backbone's defaults say now
        assert recipe.mean is not None and recipe.std is not None  # a normalising recipe records both
        backbone.mean, backbone.std = tuple(recipe.mean), tuple(recipe.std)
    return FeatureMaker(recipe, backbone.place(device).eval(), device, batch_size, workers), notes
