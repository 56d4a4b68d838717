"""A person's clips as features: finding videos and action folders, probing them, cutting recordings
into windows, and making features with exactly the recipe a checkpoint was trained on (FeatureMaker).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch

from pipeline.data.manifests import VIDEO_SUFFIXES
from pipeline.data.video import (
    FRAMES,
    SAMPLING_RULE_VERSION,
    ShortVideo,
    VideoError,
    ViewSpec,
)
from pipeline.features.backbones import Backbone, get_backbone
from pipeline.features.extract import RunOptions, VideoJob, run_jobs
from pipeline.features.recipe import FeatureRecipe
from pipeline.predict.windows import EPS, probe_video, recording_end, window_spans
from pipeline.runtime.workers import imap_isolated
from pipeline.training.checkpoints import (
    CheckpointError,
    load_backbone_weights,
)

PROTO = "proto"
# Folders that tools leave beside a person's clips: never actions, never clips (any hidden name too:
# .ipynb_checkpoints, .DS_Store, macOS's ._clip.mp4 resource forks).
TOOL_FOLDERS = frozenset({"__MACOSX", "__pycache__"})


class PredictError(ValueError):
    """A checkpoint, support set, weights file or option that cannot be used; the message names it and why."""


# ---------------------------------------------------------------------------------------------- files


def ignored_name(name: str) -> bool:
    """A hidden name or a tool's folder (TOOL_FOLDERS): skipped when searching for actions and clips."""
    return name.startswith(".") or name in TOOL_FOLDERS


def scan_videos(paths: Iterable[Path | str]) -> tuple[list[Path], list[Path]]:
    """(videos, ignored): files as given (any name), folders searched recursively for video files in
    sorted order, skipping hidden files and hidden or tool folders (each skipped folder listed once)."""
    found: list[Path] = []
    ignored: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            found.append(path)
            continue
        for p in sorted(path.rglob("*")):
            parts = p.relative_to(path).parts
            hidden = next((k for k, part in enumerate(parts) if ignored_name(part)), None)
            if hidden is not None:
                skipped = path.joinpath(*parts[: hidden + 1])
                if skipped not in ignored and (p.is_dir() or p.suffix.lower() in VIDEO_SUFFIXES):
                    ignored.append(skipped)
            elif p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES:
                found.append(p)
    return found, ignored


def find_videos(paths: Iterable[Path | str]) -> list[Path]:
    """Files as given (any name), folders searched recursively for video files, in sorted order (scan_videos)."""
    return scan_videos(paths)[0]


def support_folder(folder: Path) -> tuple[list[tuple[Path, str]], list[Path]]:
    """((clip, action) for every video under SUPPORT/<action>/, actions in sorted order; the hidden and
    tool folders and files that were ignored)."""
    if not folder.is_dir():
        raise PredictError(f"{folder}: no such support folder (expected SUPPORT/<action>/<clip>) or support index")
    folders = sorted(p for p in folder.iterdir() if p.is_dir())
    ignored = [p for p in folders if ignored_name(p.name)]
    actions = [p for p in folders if not ignored_name(p.name)]
    clips = []
    for action in actions:
        videos, skipped = scan_videos([action])
        clips += [(clip, action.name) for clip in videos]
        ignored += skipped
    empty = [a.name for a in actions if not any(name == a.name for _, name in clips)]
    if empty:
        raise PredictError(f"{folder}: action folder(s) {', '.join(empty)} hold no video files")
    if len(actions) < 2:
        loose = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES]
        found = f"{len(loose)} video file(s) directly in it and " if loose else ""
        raise PredictError(
            f"{folder}: {found}{len(actions)} action folder(s); a support set is SUPPORT/<action>/<clip>, "
            "one folder per action, at least 2 actions"
        )
    return clips, ignored


# ---------------------------------------------------------------------------------------------- features


@dataclass
class Planned:
    """A recording's windows: their jobs, (start, end) times in seconds and frame counts, or the reason it has none."""

    jobs: list[VideoJob]
    times: list[tuple[float, float]]
    frames: list[int]
    reason: str | None = None


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

    def run(
        self, jobs: list[VideoJob], progress: Callable[[int], None] | None = None
    ) -> tuple[dict[int, torch.Tensor | str], dict[int, int]]:
        """(job index -> features [L, P*P, D] or the reason it failed; job index -> frame count of each clip
        with fewer than L frames, whose frames were repeated). Decoding runs in crash-isolated workers; a
        clip refused by the authors' rule for being short is taken again with repeats (the sampling rule's
        indices over the frames there are), so only a clip with no decodable frame fails for its length."""
        results = self._run(jobs, progress)
        short: dict[int, int] = {}
        again = []
        for job in jobs:
            frames = ShortVideo.frames_in(r) if isinstance(r := results[job.index], str) else None
            if job.window is None and frames is not None:
                short[job.index] = frames
                again.append(dataclasses.replace(job, n_frames=frames, window=(0, frames)))
        if again:
            results.update(self._run(again, None))
        return results, {k: n for k, n in short.items() if isinstance(results[k], torch.Tensor)}

    def _run(self, jobs: list[VideoJob], progress: Callable[[int], None] | None) -> dict[int, torch.Tensor | str]:
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

    def window_jobs(self, paths: Sequence[Path], window_s: float, stride_s: float, first_index: int) -> list[Planned]:
        """Per recording, its windows cut by the frames' own timestamps (window_spans). The recordings are
        probed in one pool of crash-isolated workers."""
        out: list[Planned] = []
        for path, probed in zip(paths, _probe([str(p) for p in paths], self.workers), strict=False):
            if isinstance(probed, str):
                out.append(Planned([], [], [], probed))
                continue
            times = probed
            if not times:
                out.append(Planned([], [], [], "no decodable frame"))
                continue
            spans = window_spans(times, window_s, stride_s)
            rate = len(times) / recording_end(times)
            if recording_end(times) > window_s + EPS and round(window_s * rate) < FRAMES:
                reason = (
                    f"a window of {window_s:g} s is about {round(window_s * rate)} frames at {rate:.3g} fps; "
                    f"a window needs at least {FRAMES} (--window)"
                )
                out.append(Planned([], [], [], reason))
                continue
            jobs = [
                VideoJob("window", first_index + k, str(path), str(path), len(times), 1, 0, self.spec, window=(f, n))
                for k, (f, n, _, _) in enumerate(spans)
            ]
            first_index += len(jobs)
            out.append(Planned(jobs, [(t0, t1) for _, _, t0, t1 in spans], [n for _, n, _, _ in spans]))
        return out


def _short_reason(reason: str) -> str:
    """A decoder's reason without the exception's class name."""
    for prefix in ("VideoError: ", "ShortVideo: ", "ValueError: "):
        reason = reason.removeprefix(prefix)
    return reason


def _probe(paths: list[str], workers: int) -> list[list[float] | str]:
    if workers == 0:
        out: list[list[float] | str] = []
        for p in paths:
            try:
                out.append(probe_video(p))
            except (VideoError, ValueError, OSError) as err:
                out.append(str(err))
        return out
    results: dict[str, list[float] | str] = {
        item: (cast(list[float], value) if error is None else _short_reason(error))  # no error: a result
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
