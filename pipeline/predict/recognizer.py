"""Predict: a trained model recognises actions in a person's own clips and long recordings.

A support folder (one sub-folder per action, a few clips each) and query clips become features
with exactly the recipe the checkpoint was trained on (`FeatureMaker`: the recipe's backbone,
weights, layer, input geometry, normalisation and the test-view sampling rule, through the same
decode -> backbone -> pool path as extraction), then the heads encode each clip once and relate
the queries to the support with any number of clips per action. Probabilities are
softmax(logits / T) with T calibrated on the support by leave-one-out (pipeline/evaluation/unknown.py); a
long recording is cut into sliding windows, each classified like a clip.

`FewShotRecognizer` is the API: from_checkpoint(...), add_support(folder or saved index),
save_support(file), predict(paths), stream(live source) (pipeline/predict/stream.py). The support index is a safetensors file (loading it never
executes code) with the per-video embeddings, action names, paths, the checkpoint's sha256 and
the recipe; an index made with another checkpoint or recipe is refused with the difference named,
and one with a bad field names the field (pipeline/predict/index.py). Decoding workers start without
re-importing the caller's script, so a plain script needs no `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from pipeline.data.manifests import VIDEO_SUFFIXES
from pipeline.data.protocol import FRAMES
from pipeline.data.video import ViewSpec
from pipeline.evaluation.batched import ProtoBaseline
from pipeline.evaluation.unknown import (
    auto_score,
    calibrate,
    leave_one_out,
    ranking,
    relate_open,
    scores,
    threshold,
)
from pipeline.features.backbones import get_backbone
from pipeline.features.extract import ExtractSettings
from pipeline.features.extract import recipe as extraction_recipe
from pipeline.predict.clips import (
    PROTO,
    FeatureMaker,
    PredictError,
    feature_maker,
    scan_videos,
    support_folder,
)
from pipeline.predict.outputs import merge_segments
from pipeline.predict.records import clip_record, window_record
from pipeline.predict.stream import LiveStream, StreamSettings, check_source, window_features, window_view
from pipeline.predict.support import HeldOut, SupportSet
from pipeline.runtime import distributed
from pipeline.training.checkpoints import (
    CheckpointError,
    load_checkpoint,
)

QUERY_CHUNK = 64  # query videos related to the support at a time
# Segments shorter than this share of the window are absorbed by a neighbour: one window's own time is
# kept when windows do not overlap, and two windows must agree at stride = window / 4. Measured on the
# demo's recordings (README, "Use a trained model on your own clips"): 0.5 beat 0.25, 0.75 and 1.
MIN_SEGMENT_OF_WINDOW = 0.5


# ---------------------------------------------------------------------------------------------- predictions


@dataclass
class UnknownRule:
    """Label a query `unknown` when `score` falls below the threshold that rejects `false_rejection` of
    the support's own held-out clips."""

    false_rejection: float = 0.05
    score: str | None = None  # None: auto_score's choice (a trained open-set score when the model has one)


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


class FewShotRecognizer:
    """A checkpoint (or the training-free `proto`) plus its feature recipe, ready for support and query clips."""

    def __init__(
        self, model: nn.Module, checkpoint: str, checkpoint_sha256: str, maker: FeatureMaker, notes: list[str]
    ) -> None:
        self.model, self.checkpoint, self.checkpoint_sha256 = model.eval(), checkpoint, checkpoint_sha256
        self.maker, self.notes = maker, notes
        self.support: SupportSet | None = None
        self.ignored: list[str] = []  # hidden and tool folders skipped among the queries

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        *,
        backbone: str | None = None,
        weights: Path | None = None,
        allow_other_weights: bool = False,
        device: str = "auto",
        batch_size: int = 64,
        workers: int = 2,
    ) -> FewShotRecognizer:
        """Any checkpoint pipeline.checkpoints reads, or "proto" with `backbone` (nearest class mean of its features)."""
        dev = distributed.resolve_device(device)
        weights = Path(weights) if weights is not None else None
        if str(checkpoint) == PROTO:
            if not backbone:
                raise PredictError("proto needs --backbone NAME (e.g. dinov2_vits14, tf_efficientnet_lite0)")
            net = get_backbone(backbone, weights=weights, image_size=ViewSpec().crop)
            spec = ViewSpec(interpolation=net.interpolation)
            recipe = extraction_recipe(
                net, ExtractSettings(views=1, spec=spec), distributed.resolve_precision("auto", dev)
            )
            maker, notes = feature_maker(recipe, backbone=net, device=dev, batch_size=batch_size, workers=workers)
            return cls(ProtoBaseline(), PROTO, f"proto:{recipe.weights}", maker, notes)
        try:
            loaded = load_checkpoint(checkpoint)
        except CheckpointError as err:
            raise PredictError(str(err)) from None
        if loaded.recipe is None:
            raise PredictError(
                f"{checkpoint}: does not record the features its heads were trained on, so clips "
                "cannot be turned into them (retrain with this strm, or use proto --backbone NAME)"
            )
        maker, notes = feature_maker(
            loaded.recipe,
            state=loaded.backbone_state,
            weights=weights,
            allow_other_weights=allow_other_weights,
            device=dev,
            batch_size=batch_size,
            workers=workers,
        )
        return cls(loaded.heads.to(dev), str(checkpoint), loaded.sha256, maker, loaded.notes + notes)

    # ------------------------------------------------------------------ support

    def _encode(self, features: list[torch.Tensor]) -> Any:
        """Per-video embeddings of clip features [L, P*P, D] (heads.encode, eval mode, no grad)."""
        x = torch.stack(features).to(self.maker.device, torch.float32)
        with torch.inference_mode():
            return cast(Any, self.model).encode(x)  # STRMHeads or ProtoBaseline: both have encode

    def add_support(self, source: Path | str, progress: Callable[[int, int], None] | None = None) -> SupportSet:
        """A support folder (decoded and encoded once) or a saved index; PredictError names what is wrong.
        Either way the support's own leave-one-out accuracy is measured (`held_out`), and a note warns when
        it is near chance."""
        source = Path(source)
        if source.is_file():
            support = SupportSet.load(source, self.checkpoint_sha256, self.maker.recipe, self.maker.backbone.weights_id)
            support.embedding = support.embedding.to(self.maker.device)
            support.held_out = self._held_out(support.embedding, support.labels, len(support.actions), str(source))
        else:
            support = self._support_folder(source, progress)
        self.notes += [n for n in getattr(support.calibration, "notes", []) if n not in self.notes]
        if support.held_out is not None and support.held_out.near_chance():
            self.notes.append(support.held_out.sentence())
        self.support = support
        return support

    def _support_folder(self, source: Path, progress: Callable[[int, int], None] | None) -> SupportSet:
        clips, ignored = support_folder(source)
        actions = sorted({a for _, a in clips})
        paths = [p for p, _ in clips]
        results, short = self.maker.run(self.maker.clip_jobs(paths, "support"), _counter(progress, len(paths)))
        used = [(str(p), a) for k, (p, a) in enumerate(clips) if isinstance(results[k], torch.Tensor)]
        failed = [(str(p), r) for k, (p, a) in enumerate(clips) if isinstance(r := results[k], str)]
        lost = [a for a in actions if not any(action == a for _, action in used)]
        if lost:
            raise PredictError(
                f"{source}: no clip of action(s) {', '.join(lost)} could be used ("
                + "; ".join(f"{p}: {r}" for p, r in failed)
                + ")"
            )
        labels = torch.tensor([actions.index(a) for _, a in used])
        embedding = self._encode([r for k in range(len(clips)) if isinstance(r := results[k], torch.Tensor)])
        held = self._held_out(embedding, labels, len(actions), "the support clips' features")
        calibration = calibrate(self.model, embedding, labels.to(self.maker.device), len(actions))
        support = SupportSet(
            actions,
            labels,
            embedding,
            used,
            failed,
            calibration,
            self.checkpoint_sha256,
            self.maker.recipe,
            self.maker.backbone.weights_id,
            held_out=held,
            ignored=[str(p) for p in ignored],
            repeated={str(paths[k]): n for k, n in short.items()},
        )
        if not calibration.support_scores.get("max_logit"):
            self.notes.append(
                "no action has 2 support clips to hold one out, so the temperature is 1 (probabilities "
                "uncalibrated) and --unknown has no threshold: add a second clip to an action"
            )
        if short:
            self.notes.append(
                f"{len(short)} support clip(s) have fewer than {FRAMES} frames (fewest {min(short.values())}): "
                "their frames are repeated to make "
                f"{FRAMES} (the sampling rule's indices over the frames there are)"
            )
        return support

    def _held_out(self, embedding: Any, labels: torch.Tensor, way: int, where: str) -> HeldOut:
        """The support's leave-one-out accuracy; PredictError naming the cause when its logits are not finite."""
        logits, _, truth = leave_one_out(self.model, embedding, labels.to(self.maker.device), way)
        if not torch.isfinite(logits).all():
            raise self._not_finite(where)
        return HeldOut(len(truth), int((logits.argmax(-1) == truth).sum()) if len(truth) else 0, way)

    def _bad_weights(self) -> list[str]:
        """The names of the heads' tensors that hold NaN or inf."""
        tensors = [*self.model.named_parameters(), *self.model.named_buffers()]
        return [name for name, t in tensors if t.is_floating_point() and not torch.isfinite(t).all()]

    def _not_finite(self, where: str) -> PredictError:
        """Why logits came out NaN or inf: the checkpoint's weights when they hold any, else the features."""
        bad = self._bad_weights()
        if bad:
            return PredictError(
                f"non-finite logits (NaN or inf): the checkpoint's weights hold NaN or inf ({len(bad)} "
                f"tensor(s), e.g. {bad[0]}): {self.checkpoint} is damaged or its training diverged"
            )
        return PredictError(
            f"non-finite logits (NaN or inf) from {where}: the features overflow the checkpoint's heads "
            "(check the backbone weights, --weights, and that the clips suit this checkpoint's recipe)"
        )

    def save_support(self, path: Path | str) -> Path:
        if self.support is None:
            raise PredictError("no support set yet: add_support(folder) first")
        return self.support.save(Path(path))

    # ------------------------------------------------------------------ queries

    def _classify(self, features: list[torch.Tensor], top_k: int, unknown: UnknownRule | None) -> list[dict]:
        """Each clip's logits, calibrated probabilities, top-k and (with a rule) unknown verdict; a clip whose
        logits are not finite gets {"failed": why} (the checkpoint's weights are checked first)."""
        support = self.support
        assert support is not None  # predict checks it before classifying
        actions, way, cal = support.actions, len(support.actions), support.calibration
        labels = support.labels.to(self.maker.device)
        name = (unknown.score or auto_score(cal)) if unknown else ""
        cut = threshold(cal, name, unknown.false_rejection) if unknown else None
        rows: list[dict] = []
        for start in range(0, len(features), QUERY_CHUNK):
            query = self._encode(features[start : start + QUERY_CHUNK])
            logits, qc, known = relate_open(self.model, support.embedding, labels, query, way)
            finite = torch.isfinite(logits).all(-1)
            if not finite.all() and self._bad_weights():
                raise self._not_finite("these clips' features")
            probs = (logits.double() / cal.temperature).softmax(-1)
            values = scores(logits, qc, cal, known) if unknown else {}
            orders = ranking(logits)  # the one rule: its first column is what evaluate scores
            for i in range(len(logits)):
                if not finite[i]:
                    rows.append({"failed": str(self._not_finite("this clip's features"))})
                    continue
                order = orders[i].tolist()
                best = actions[order[0]]
                row = {
                    "prediction": best,
                    "probability": float(probs[i, order[0]]),
                    "probabilities": {a: float(probs[i, c]) for c, a in enumerate(actions)},
                    "top_k": [[actions[c], float(probs[i, c])] for c in order[:top_k]],
                    "logits": {a: float(logits[i, c]) for c, a in enumerate(actions)},
                }
                if unknown:
                    score = float(values[name][i])
                    assert cut is not None  # a rule gives a threshold
                    row.update(action=best, score=score, score_name=name, threshold=cut)
                    if score < cut:
                        row["prediction"] = "unknown"
                rows.append(row)
        return rows

    def _check_options(self, window: float | None, stride: float | None, unknown: UnknownRule | None) -> None:
        """PredictError for options that cannot work, before anything is decoded."""
        if self.support is None:
            raise PredictError("no support set yet: add_support(folder or index) first")
        if stride is not None and window is None:
            raise PredictError("--stride needs --window (the length of the windows it moves)")
        if window is not None and (window <= 0 or (stride is not None and stride <= 0)):
            raise PredictError("--window and --stride are seconds above 0")
        if window is not None and stride is not None and stride > window + 1e-9:
            raise PredictError(
                f"--stride {stride:g} s is longer than --window {window:g} s: the frames between windows would "
                "be seen by none while segments claim them; use a stride at most the window"
            )
        if unknown is not None and not self.support.calibration.support_scores.get(
            unknown.score or auto_score(self.support.calibration)
        ):
            raise PredictError(
                "--unknown needs a threshold from held-out support clips, and no action of the support "
                "has 2 clips: add a second clip to at least one action, or use --unknown off"
            )

    def predict(
        self,
        paths: Iterable[Path | str] | Path | str,
        *,
        top_k: int = 3,
        window: float | None = None,
        stride: float | None = None,
        unknown: UnknownRule | None = None,
        min_segment: float | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[dict]:
        """One record per query video (a path, or several: files, or folders searched recursively, hidden and
        tool folders skipped), in order; a failed clip has status "failed" and its reason, and never stops the
        others. A clip of fewer than L frames is classified with frames repeated (its `note` says so). With
        `window` (seconds), each query also gets its sliding windows (stride seconds apart, at most the
        window; cut and timed by the frames' own timestamps) and their segments, where a segment shorter than
        `min_segment` seconds (default: half the window) is absorbed by a neighbour."""
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        self._check_options(window, stride, unknown)
        videos, ignored = scan_videos(paths)
        self.ignored += [str(p) for p in ignored]
        if not videos:
            raise PredictError(
                f"no query videos in {', '.join(map(str, paths)) or 'the arguments'} "
                f"(files, or folders holding {', '.join(sorted(VIDEO_SUFFIXES))})"
            )
        jobs = self.maker.clip_jobs(videos, "query")
        planned = self.maker.window_jobs(videos, window, stride or window, len(jobs)) if window is not None else []
        for plan in planned:
            jobs += plan.jobs
        results, short = self.maker.run(jobs, _counter(progress, len(jobs)))
        ok = [i for i in range(len(jobs)) if isinstance(results[i], torch.Tensor)]
        features = [cast(torch.Tensor, results[i]) for i in ok]  # ok: the jobs that gave features
        classified = dict(zip(ok, self._classify(features, top_k, unknown), strict=True))
        records = [clip_record(str(v), results[k], classified.get(k), short.get(k)) for k, v in enumerate(videos)]
        if window is not None:
            min_length = MIN_SEGMENT_OF_WINDOW * window if min_segment is None else min_segment
            for record, plan in zip(records, planned, strict=True):
                record["windows"] = [
                    window_record(t, n, results[j.index], classified.get(j.index))
                    for j, t, n in zip(plan.jobs, plan.times, plan.frames, strict=True)
                ]
                record["segments"] = merge_segments(record["windows"], min_length)
                if plan.reason is not None:
                    record["windows_reason"] = plan.reason
        return records

    def stream(
        self,
        source: str | Path,
        *,
        window: float = 2.0,
        stride: float | None = None,
        top_k: int = 3,
        unknown: UnknownRule | None = None,
        min_segment: float | None = None,
        reconnect: int = 3,
        backoff_s: float = 1.0,
        timeout_s: float = 10.0,
        on_frame: Callable[[np.ndarray, float], None] | None = None,
        on_notice: Callable[[str], None] | None = None,
    ) -> LiveStream:
        """A live source (a camera /dev/videoN, an rtsp/http(s)/tcp/udp URL, a file still being written) as
        windows classified while it plays: `for window in r.stream(source): ...` gives StreamWindow records
        (pipeline/predict/stream.py says how windows are cut, skipped when behind, and reconnected), then
        close() gives the segments still open. `on_frame(rgb HxWx3 uint8, stream time)` sees every frame in
        the reading thread (keep it quick); `on_notice(text)` hears reconnects and skipped windows."""
        self._check_options(window, stride, unknown)
        if reconnect < 0 or backoff_s < 0 or timeout_s <= 0:
            raise PredictError("--reconnect is a count >= 0; the backoff >= 0 s and the timeout > 0 s")
        check_source(str(source))
        settings = StreamSettings(
            window=window,
            stride=stride or window,
            min_segment=MIN_SEGMENT_OF_WINDOW * window if min_segment is None else min_segment,
            reconnect=reconnect,
            backoff_s=backoff_s,
            timeout_s=timeout_s,
        )

        def classify(images: list) -> dict:
            features = window_features(self.maker, window_view(images, self.maker.spec))
            if isinstance(features, str):
                return {"failed": features}
            return self._classify([features], top_k, unknown)[0]

        return LiveStream(str(source), settings, classify, on_frame, on_notice)

    def report(self, records: list[dict]) -> dict:
        """The JSON document of a run: checkpoint, recipe, actions, support used, failed and ignored, its
        leave-one-out accuracy, notes, ignored query folders and the queries."""
        support = self.support
        assert support is not None, "report() needs add_support() first"
        return {
            "checkpoint": self.checkpoint,
            "recipe": self.maker.recipe.to_dict(),
            "actions": support.actions,
            "support": {
                "used": [{"path": p, "action": a} for p, a in support.used],
                "failed": [{"path": p, "reason": r} for p, r in support.failed],
                "ignored": support.ignored,
                "repeated": [{"path": p, "frames": n} for p, n in support.repeated.items()],
                "leave_one_out": support.held_out.to_dict() if support.held_out else None,
            },
            "temperature": support.calibration.temperature,
            "notes": self.notes,
            "ignored": self.ignored,
            "queries": records,
        }


def _counter(progress: Callable[[int, int], None] | None, total: int) -> Callable[[int], None] | None:
    if progress is None:
        return None
    done = [0]

    def step(k: int) -> None:
        done[0] += k
        progress(done[0], total)

    return step
