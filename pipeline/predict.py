"""Predict: a trained model recognises actions in a person's own clips and long recordings.

A support folder (one sub-folder per action, a few clips each) and query clips become features
with exactly the recipe the checkpoint was trained on (`FeatureMaker`: the recipe's backbone,
weights, layer, input geometry, normalisation and the test-view sampling rule, through the same
decode -> backbone -> pool path as extraction), then the heads encode each clip once and relate
the queries to the support with any number of clips per action. Probabilities are
softmax(logits / T) with T calibrated on the support by leave-one-out (pipeline/unknown.py); a
long recording is cut into sliding windows, each classified like a clip.

`FewShotRecognizer` is the API: from_checkpoint(...), add_support(folder or saved index),
save_support(file), predict(paths). The support index is a safetensors file (loading it never
executes code) with the per-video embeddings, action names, paths, the checkpoint's sha256 and
the recipe; an index made with another checkpoint or recipe is refused with the difference named.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import distributed
from pipeline.backbones import Backbone, get_backbone
from pipeline.cache import FeatureRecipe
from pipeline.checkpoints import CheckpointError, load_backbone_weights, load_checkpoint
from pipeline.evaluate import ProtoBaseline
from pipeline.extract import ExtractSettings, RunOptions, VideoJob, recipe as extraction_recipe, run_jobs
from pipeline.heads import VideoEmbedding
from pipeline.manifests import VIDEO_SUFFIXES
from pipeline.unknown import DEFAULT_SCORE, Calibration, calibrate, relate, scores, threshold
from pipeline.video import FRAMES, SAMPLING_RULE_VERSION, VideoError, ViewSpec, count_frames, frame_rate
from pipeline.workers import imap_isolated

INDEX_FORMAT = "strm-support/1"
PROTO = "proto"
QUERY_CHUNK = 64  # query videos related to the support at a time


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
        run_jobs(jobs, self.backbone, normalize=self.recipe.normalize, patches=self.recipe.patches, options=options,
                 device=self.device, precision=self.recipe.precision, on_features=done, on_failure=failed)
        return results

    def clip_jobs(self, paths: Sequence[Path], kind: str) -> list[VideoJob]:
        """One job per clip: its test view (view 0 of the sampling rule), whole."""
        return [VideoJob(kind, k, str(p), str(p), -1, 1, 0, self.spec) for k, p in enumerate(paths)]

    def window_jobs(self, paths: Sequence[Path], window_s: float, stride_s: float, first_index: int
                    ) -> list[tuple[list[VideoJob], list[tuple[float, float]], str | None]]:
        """Per recording: the jobs of its windows and their (start, end) times in seconds, or the reason it
        has none. The recordings are probed in one pool of crash-isolated workers."""
        out = []
        for path, probed in zip(paths, _probe([str(p) for p in paths], self.workers)):
            if isinstance(probed, str):
                out.append(([], [], probed))
                continue
            frames, fps = probed
            starts = window_starts(frames, fps, window_s, stride_s)
            if frames > starts[0][1] and starts[0][1] < FRAMES:
                out.append(([], [], f"a window of {window_s:g} s is {starts[0][1]} frames at {fps:g} fps; "
                                    f"a window needs at least {FRAMES} (--window)"))
                continue
            jobs = [VideoJob("window", first_index + k, str(path), str(path), frames, 1, 0, self.spec, window=w)
                    for k, w in enumerate(starts)]
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
    results = {item: (value if error is None else _short_reason(error))
               for item, value, error in imap_isolated(probe_video, paths, workers=workers)}
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
    return get_backbone(recipe.backbone, weights=weights, layer=recipe.layer, pretrained=weights is None,
                        image_size=recipe.crop)


def feature_maker(recipe: FeatureRecipe, *, state: dict | None = None, weights: Path | None = None,
                  backbone: Backbone | None = None, allow_other_weights: bool = False, device: torch.device,
                  batch_size: int = 64, workers: int = 2) -> tuple[FeatureMaker, list[str]]:
    """A FeatureMaker for `recipe` (with `backbone` when it is already built), and notes; PredictError when
    the recipe cannot be rebuilt exactly."""
    if recipe.sampling_rule != SAMPLING_RULE_VERSION:
        raise PredictError(f"the checkpoint's features used sampling rule {recipe.sampling_rule!r}; this strm samples "
                           f"{SAMPLING_RULE_VERSION!r}: re-extract and retrain, or use the strm that made it")
    if recipe.frames != FRAMES:
        raise PredictError(f"the checkpoint's features have L={recipe.frames} frames; this strm samples {FRAMES}")
    backbone = backbone or _weights_backbone(recipe, weights, state)
    notes = []
    if backbone.weights_id != recipe.weights:
        message = (f"the backbone weights differ from the ones the heads were trained on "
                   f"({backbone.weights_id[:16]} here, {recipe.weights[:16]} recorded)")
        if not allow_other_weights:
            raise PredictError(message + ": pass --weights with the recorded file, or --allow-other-weights")
        notes.append(message + " (--allow-other-weights): predictions may be meaningless")
    if recipe.normalize:  # the recipe's own statistics, whatever the backbone's defaults say now
        backbone.mean, backbone.std = tuple(recipe.mean), tuple(recipe.std)
    return FeatureMaker(recipe, backbone.place(device).eval(), device, batch_size, workers), notes


# ---------------------------------------------------------------------------------------------- the support set


@dataclass
class SupportSet:
    """The support clips' per-video embeddings, their actions, and the leave-one-out calibration."""

    actions: list[str]
    labels: torch.Tensor  # [n] action index of each used clip
    embedding: Any  # VideoEmbedding [n] (heads) or a tensor [n, L*D] (proto)
    used: list[tuple[str, str]]  # (path, action)
    failed: list[tuple[str, str]]  # (path, reason)
    calibration: Calibration
    checkpoint_sha256: str
    recipe: FeatureRecipe
    weights_id: str  # the backbone weights the clips went through (may differ from the recipe's with --allow-other-weights)

    def save(self, path: Path) -> Path:
        """A safetensors file: the embeddings as tensors, everything else as JSON metadata."""
        from safetensors.torch import save_file

        tensors = {"labels": self.labels.contiguous()}
        if isinstance(self.embedding, torch.Tensor):
            tensors["embedding"] = self.embedding.contiguous()
        else:
            for f in fields(VideoEmbedding):
                value = getattr(self.embedding, f.name)
                if isinstance(value, tuple):
                    tensors.update({f"embedding.{f.name}.{i}": t.contiguous() for i, t in enumerate(value)})
                elif value is not None:
                    tensors[f"embedding.{f.name}"] = value.contiguous()
        meta = {"format": INDEX_FORMAT, "actions": self.actions, "used": self.used, "failed": self.failed,
                "calibration": self.calibration.to_dict(), "checkpoint_sha256": self.checkpoint_sha256,
                "recipe": self.recipe.to_dict(), "weights_id": self.weights_id}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.cpu() for k, v in tensors.items()}, str(path), metadata={"strm": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: Path, checkpoint_sha256: str, recipe: FeatureRecipe, weights_id: str) -> SupportSet:
        """A saved index, refused (naming the difference) when made with another checkpoint, recipe or weights."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("strm", "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same error to the user
            raise PredictError(f"{path}: not a support index ({type(err).__name__}: {err})") from None
        if meta.get("format") != INDEX_FORMAT:
            raise PredictError(f"{path}: not a support index (format {meta.get('format')!r}, expected {INDEX_FORMAT!r})")
        if meta["checkpoint_sha256"] != checkpoint_sha256:
            raise PredictError(f"{path}: made with another checkpoint (sha256 {meta['checkpoint_sha256'][:12]}, this "
                               f"one is {checkpoint_sha256[:12]}): save the support again with this checkpoint")
        saved = FeatureRecipe.from_dict(meta["recipe"])
        names = [f.name for f in fields(FeatureRecipe)]
        differ = saved.differences(recipe, names)
        if differ:
            raise PredictError(f"{path}: made with another feature recipe ({'; '.join(differ)}: index vs checkpoint)")
        if meta["weights_id"] != weights_id:
            raise PredictError(f"{path}: made with other backbone weights ({meta['weights_id'][:16]}, these are "
                               f"{weights_id[:16]}): save the support again with these weights")
        if "embedding" in tensors:
            embedding: Any = tensors["embedding"]
        else:
            parts: dict[str, Any] = {}
            for f in fields(VideoEmbedding):
                keys = sorted((k for k in tensors if k.startswith(f"embedding.{f.name}.")), key=lambda k: int(k.rsplit(".", 1)[1]))
                if keys:
                    parts[f.name] = tuple(tensors[k] for k in keys)
                elif f"embedding.{f.name}" in tensors:
                    parts[f.name] = tensors[f"embedding.{f.name}"]
            embedding = VideoEmbedding(**{k: parts.get(k, ()) for k in
                                          ("trm_k", "trm_k_rstd", "trm_v", "qc", "qc_norms", "tuples")})
        return cls(meta["actions"], tensors["labels"], embedding, [tuple(x) for x in meta["used"]],
                   [tuple(x) for x in meta["failed"]], Calibration.from_dict(meta["calibration"]), checkpoint_sha256,
                   saved, weights_id)


# ---------------------------------------------------------------------------------------------- predictions


@dataclass
class UnknownRule:
    """Label a query `unknown` when `score` falls below the threshold that rejects `false_rejection` of
    the support's own held-out clips."""

    false_rejection: float = 0.05
    score: str = DEFAULT_SCORE


def parse_unknown(text: str) -> UnknownRule | None:
    """--unknown off | auto | P (the false-rejection rate aimed at, e.g. 0.05)."""
    text = text.strip().lower()
    if text == "off":
        return None
    if text == "auto":
        return UnknownRule()
    try:
        rate = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise PredictError(f"--unknown {text!r}: expected auto, off or a false-rejection rate such as 0.05") from None
    if not 0 < rate < 1:
        raise PredictError(f"--unknown {text!r}: the false-rejection rate must be between 0 and 1")
    return UnknownRule(rate)


def merge_segments(windows: list[dict]) -> list[dict]:
    """Adjacent windows of one prediction merged into segments that do not overlap: each window owns the
    time from halfway to the previous window's centre to halfway to the next's (the first from its start,
    the last to its end); [{start, end, prediction, probability (the windows' mean)}]."""
    centres = [(w["start"] + w["end"]) / 2 for w in windows]
    segments: list[dict] = []
    for i, w in enumerate(windows):
        lo = w["start"] if i == 0 else (centres[i - 1] + centres[i]) / 2
        hi = w["end"] if i == len(windows) - 1 else (centres[i] + centres[i + 1]) / 2
        if w.get("prediction") is None:
            continue
        last = segments[-1] if segments else None
        if last is not None and last["prediction"] == w["prediction"] and last["end"] == lo:
            last["end"], last["_p"] = hi, last["_p"] + [w["probability"]]
        else:
            segments.append({"start": lo, "end": hi, "prediction": w["prediction"], "_p": [w["probability"]]})
    return [{"start": round(s["start"], 3), "end": round(s["end"], 3), "prediction": s["prediction"],
             "probability": float(np.mean(s.pop("_p")))} for s in segments]


class FewShotRecognizer:
    """A checkpoint (or the training-free `proto`) plus its feature recipe, ready for support and query clips."""

    def __init__(self, model: nn.Module, checkpoint: str, checkpoint_sha256: str, maker: FeatureMaker,
                 notes: list[str]) -> None:
        self.model, self.checkpoint, self.checkpoint_sha256 = model.eval(), checkpoint, checkpoint_sha256
        self.maker, self.notes = maker, notes
        self.support: SupportSet | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, *, backbone: str | None = None, weights: Path | None = None,
                        allow_other_weights: bool = False, device: str = "auto", batch_size: int = 64,
                        workers: int = 2) -> FewShotRecognizer:
        """Any checkpoint pipeline.checkpoints reads, or "proto" with `backbone` (nearest class mean of its features)."""
        dev = distributed.resolve_device(device)
        weights = Path(weights) if weights is not None else None
        if str(checkpoint) == PROTO:
            if not backbone:
                raise PredictError("proto needs --backbone NAME (e.g. dinov2_vits14, tf_efficientnet_lite0)")
            net = get_backbone(backbone, weights=weights, image_size=ViewSpec().crop)
            spec = ViewSpec(interpolation=net.interpolation)
            recipe = extraction_recipe(net, ExtractSettings(views=1, spec=spec), distributed.resolve_precision("auto", dev))
            maker, notes = feature_maker(recipe, backbone=net, device=dev, batch_size=batch_size, workers=workers)
            return cls(ProtoBaseline(), PROTO, f"proto:{recipe.weights}", maker, notes)
        try:
            loaded = load_checkpoint(checkpoint)
        except CheckpointError as err:
            raise PredictError(str(err)) from None
        if loaded.recipe is None:
            raise PredictError(f"{checkpoint}: does not record the features its heads were trained on, so clips "
                               "cannot be turned into them (retrain with this strm, or use proto --backbone NAME)")
        maker, notes = feature_maker(loaded.recipe, state=loaded.backbone_state, weights=weights,
                                     allow_other_weights=allow_other_weights, device=dev, batch_size=batch_size,
                                     workers=workers)
        return cls(loaded.heads.to(dev), str(checkpoint), loaded.sha256, maker, loaded.notes + notes)

    # ------------------------------------------------------------------ support

    def _encode(self, features: list[torch.Tensor]) -> Any:
        """Per-video embeddings of clip features [L, P*P, D] (heads.encode, eval mode, no grad)."""
        x = torch.stack(features).to(self.maker.device, torch.float32)
        with torch.inference_mode():
            return self.model.encode(x)

    def add_support(self, source: Path | str, progress: Callable[[int, int], None] | None = None) -> SupportSet:
        """A support folder (decoded and encoded once) or a saved index; PredictError names what is wrong."""
        source = Path(source)
        if source.is_file():
            self.support = SupportSet.load(source, self.checkpoint_sha256, self.maker.recipe,
                                           self.maker.backbone.weights_id)
            self.support.embedding = self.support.embedding.to(self.maker.device)
            return self.support
        clips = support_folder(source)
        actions = sorted({a for _, a in clips})
        paths = [p for p, _ in clips]
        counter = _counter(progress, len(paths))
        results = self.maker.run(self.maker.clip_jobs(paths, "support"), counter)
        used = [(str(p), a) for k, (p, a) in enumerate(clips) if isinstance(results[k], torch.Tensor)]
        failed = [(str(p), results[k]) for k, (p, a) in enumerate(clips) if isinstance(results[k], str)]
        lost = [a for a in actions if not any(action == a for _, action in used)]
        if lost:
            raise PredictError(f"{source}: no clip of action(s) {', '.join(lost)} could be used ("
                               + "; ".join(f"{p}: {r}" for p, r in failed) + ")")
        labels = torch.tensor([actions.index(a) for _, a in used])
        embedding = self._encode([results[k] for k in range(len(clips)) if isinstance(results[k], torch.Tensor)])
        calibration = calibrate(self.model, embedding, labels.to(self.maker.device), len(actions))
        self.support = SupportSet(actions, labels, embedding, used, failed, calibration, self.checkpoint_sha256,
                                  self.maker.recipe, self.maker.backbone.weights_id)
        if not calibration.support_scores.get("max_logit"):
            self.notes.append("no action has 2 support clips to hold one out, so the temperature is 1 (probabilities "
                              "uncalibrated) and --unknown has no threshold: add a second clip to an action")
        return self.support

    def save_support(self, path: Path | str) -> Path:
        if self.support is None:
            raise PredictError("no support set yet: add_support(folder) first")
        return self.support.save(Path(path))

    # ------------------------------------------------------------------ queries

    def _classify(self, features: list[torch.Tensor], top_k: int, unknown: UnknownRule | None) -> list[dict]:
        """Each clip's logits, calibrated probabilities, top-k and (with a rule) unknown verdict."""
        support = self.support
        actions, way, cal = support.actions, len(support.actions), support.calibration
        device = self.maker.device
        labels = support.labels.to(device)
        cut = threshold(cal, unknown.score, unknown.false_rejection) if unknown else None
        rows = []
        for start in range(0, len(features), QUERY_CHUNK):
            query = self._encode(features[start : start + QUERY_CHUNK])
            logits, qc = relate(self.model, support.embedding, labels, query, way)
            probs = (logits.double() / cal.temperature).softmax(-1)
            values = scores(logits, qc, cal) if unknown else {}
            for i in range(len(logits)):
                order = probs[i].argsort(descending=True).tolist()
                best = actions[order[0]]
                row = {"prediction": best, "probability": float(probs[i, order[0]]),
                       "probabilities": {a: float(probs[i, c]) for c, a in enumerate(actions)},
                       "top_k": [[actions[c], float(probs[i, c])] for c in order[:top_k]],
                       "logits": {a: float(logits[i, c]) for c, a in enumerate(actions)}}
                if unknown:
                    score = float(values[unknown.score][i])
                    row.update(action=best, score=score, score_name=unknown.score, threshold=cut)
                    if score < cut:
                        row["prediction"] = "unknown"
                rows.append(row)
        return rows

    def predict(self, paths: Iterable[Path | str], *, top_k: int = 3, window: float | None = None,
                stride: float | None = None, unknown: UnknownRule | None = None,
                progress: Callable[[int, int], None] | None = None) -> list[dict]:
        """One record per query video (files, or folders searched recursively), in order; a failed clip has
        status "failed" and its reason, and never stops the others. With `window` (seconds), each query
        also gets its sliding windows (stride seconds apart) and their merged segments."""
        if self.support is None:
            raise PredictError("no support set yet: add_support(folder or index) first")
        paths = list(paths)
        if stride is not None and window is None:
            raise PredictError("--stride needs --window (the length of the windows it moves)")
        if unknown is not None and not self.support.calibration.support_scores.get(unknown.score):
            raise PredictError("--unknown needs a threshold from held-out support clips, and no action of the support "
                               "has 2 clips: add a second clip to at least one action, or use --unknown off")
        videos = find_videos(paths)
        if not videos:
            raise PredictError(f"no query videos in {', '.join(map(str, paths)) or 'the arguments'} "
                               f"(files, or folders holding {', '.join(sorted(VIDEO_SUFFIXES))})")
        jobs = self.maker.clip_jobs(videos, "query")
        spans: dict[int, tuple[list[int], list[tuple[float, float]], str | None]] = {}
        if window is not None:
            planned = self.maker.window_jobs(videos, window, stride or window, len(jobs))
            for k, (window_jobs, times, reason) in enumerate(planned):
                spans[k] = ([j.index for j in window_jobs], times, reason)
                jobs += window_jobs
        results = self.maker.run(jobs, _counter(progress, len(jobs)))
        ok = [i for i in range(len(jobs)) if isinstance(results[i], torch.Tensor)]
        classified = dict(zip(ok, self._classify([results[i] for i in ok], top_k, unknown)))
        records = []
        for k, video in enumerate(videos):
            record: dict[str, Any] = {"path": str(video)}
            if k in classified:
                record.update(status="ok", reason=None, **classified[k])
            else:
                record.update(status="failed", reason=results[k], prediction=None, probability=None,
                              probabilities={}, top_k=[], logits={})
            if k in spans:
                indices, times, reason = spans[k]
                record["windows"] = [
                    {"start": round(t0, 3), "end": round(t1, 3),
                     "prediction": classified[i]["prediction"] if i in classified else None,
                     "probability": classified[i]["probability"] if i in classified else None,
                     "probabilities": classified[i]["probabilities"] if i in classified else {},
                     **({} if i in classified else {"reason": results[i]})}
                    for i, (t0, t1) in zip(indices, times)]
                record["segments"] = merge_segments(record["windows"])
                if reason is not None:
                    record["windows_reason"] = reason
            records.append(record)
        return records

    def report(self, records: list[dict]) -> dict:
        """The JSON document of a run: checkpoint, recipe, actions, support used and failed, queries."""
        support = self.support
        return {"checkpoint": self.checkpoint, "recipe": self.maker.recipe.to_dict(), "actions": support.actions,
                "support": {"used": [{"path": p, "action": a} for p, a in support.used],
                            "failed": [{"path": p, "reason": r} for p, r in support.failed]},
                "temperature": support.calibration.temperature, "notes": self.notes, "queries": records}


def _counter(progress: Callable[[int, int], None] | None, total: int) -> Callable[[int], None] | None:
    if progress is None:
        return None
    done = [0]

    def step(k: int) -> None:
        done[0] += k
        progress(done[0], total)
    return step


def write_csv(path: Path, records: list[dict]) -> Path:
    """One row per query: path, status, reason, prediction, probability, runner-up and its probability."""
    import pandas as pd

    rows = []
    for r in records:
        second = r["top_k"][1] if len(r.get("top_k", [])) > 1 else [None, None]
        rows.append({"path": r["path"], "status": r["status"], "reason": r["reason"], "prediction": r["prediction"],
                     "probability": r["probability"], "runner_up": second[0], "runner_up_probability": second[1]})
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def timeline_figure(record: dict, actions: list[str], path: Path) -> Path:
    """Time on x, one probability curve per action over the windows, the merged segments shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = [w for w in record["windows"] if w["prediction"] is not None]
    fig, ax = plt.subplots(figsize=(10, 3.2), dpi=110)
    colours = {a: plt.cm.tab10(i % 10) for i, a in enumerate(actions)}
    mids = [(w["start"] + w["end"]) / 2 for w in windows]
    for action in actions:
        ax.plot(mids, [w["probabilities"].get(action, 0.0) for w in windows], label=action, color=colours[action])
    for s in record["segments"]:
        ax.axvspan(s["start"], s["end"], color=colours.get(s["prediction"], (0.5, 0.5, 0.5, 1)), alpha=0.12, lw=0)
        ax.text((s["start"] + s["end"]) / 2, 1.02, s["prediction"], ha="center", va="bottom", fontsize=6, rotation=12)
    ax.set(xlabel="time (s)", ylabel="probability", ylim=(0, 1.1), title=Path(record["path"]).name)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = ["FewShotRecognizer", "PredictError", "SupportSet", "UnknownRule", "find_videos", "merge_segments",
           "parse_unknown", "support_folder", "timeline_figure", "window_starts", "write_csv"]
