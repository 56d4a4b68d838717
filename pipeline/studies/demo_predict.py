"""The demo's predict step: `strm predict` on held-out clips of the test split (a support folder, known and
unseen queries, one recording of three actions joined, whose true segments the demo knows since it joined
them: drawn beside the predicted ones, in the timeline and the annotated recording, with where they
disagree), with the open-set model's trained score deciding `unknown`; its facts kept in
OUT/predict/facts.json and reused while the checkpoint is the same. How well the scores tell unseen
actions is measured on the test tasks (demo_openset.py), not here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipeline.data import synth
from pipeline.data.video import decode_frames, frame_times
from pipeline.predict.annotate import annotate_recording
from pipeline.predict.outputs import disagreements, timeline_figure
from pipeline.predict.recognizer import FewShotRecognizer, UnknownRule
from pipeline.predict.windows import frame_end
from pipeline.studies.demo_plan import DemoEvents, DemoSizes

PREDICT_FACTS = 4  # the predict step's facts.json layout: older ones are computed again


def predict_stage(
    out: Path,
    manifest,
    label: str,
    checkpoint: Path,
    sizes: DemoSizes,
    workers: int,
    events: DemoEvents,
    state: dict,
) -> dict:
    """The predict step's facts with the `label` heads: reused from OUT/predict/facts.json when made with
    this checkpoint, else computed."""
    facts_path, stamp = out / "predict" / "facts.json", checkpoint.stat().st_mtime
    saved = json.loads(facts_path.read_text()) if facts_path.exists() else {}
    state["reused"] = (
        saved.get("checkpoint_mtime") == stamp
        and saved.get("version") == PREDICT_FACTS
        and saved.get("facts", {}).get("model") == label
    )
    prediction = saved["facts"] if state["reused"] else _predict(out, manifest, checkpoint, sizes, workers, events)
    prediction["model"] = label
    facts_path.write_text(json.dumps({"checkpoint_mtime": stamp, "version": PREDICT_FACTS, "facts": prediction}) + "\n")
    return prediction


def _predict(out: Path, manifest, checkpoint: Path, sizes: DemoSizes, workers: int, events: DemoEvents) -> dict:
    """`strm predict` on held-out clips: a support folder of 5 test actions x 5 clips, queries of those actions
    and of 2 actions not in the support (`--unknown auto`), and one recording of 3 actions joined."""
    rows = manifest[manifest["split"] == "test"].sort_values("video_id")
    actions = sorted(rows["class"].unique())
    rng = np.random.default_rng(sizes.seed)
    unseen = min(2, len(actions) - 2)  # 5 known and 2 unseen actions where the test split has them
    chosen = [str(a) for a in rng.choice(actions, min(len(actions), 5 + unseen), replace=False)]
    known, outsiders = chosen[: len(chosen) - unseen], chosen[len(chosen) - unseen :]
    folder = out / "predict"
    clips = {a: rows[rows["class"] == a]["path"].tolist() for a in chosen}
    for action in known:
        (folder / "support" / action).mkdir(parents=True, exist_ok=True)
        for clip in clips[action][:5]:
            link = folder / "support" / action / Path(clip).name
            if not link.is_symlink():
                link.symlink_to(Path(clip).absolute())
    queries = [(Path(c), a) for a in known for c in clips[a][5:7]] + [
        (Path(c), "unknown") for a in outsiders for c in clips[a][:2]
    ]
    recording = folder / "recording.mp4"
    parts = [decode_frames(clips[a][7], range(_frames(manifest, clips[a][7]))) for a in known[:3]]
    synth.write_mp4(torch.cat(parts).permute(0, 2, 3, 1).numpy(), recording)
    events.message(
        f"support: {folder / 'support'} ({len(known)} actions x 5 clips); {len(queries)} queries; "
        f"recording of {', '.join(known[:3])}"
    )
    recognizer = FewShotRecognizer.from_checkpoint(checkpoint, device="cpu", workers=workers)
    support = recognizer.add_support(folder / "support")
    recognizer.save_support(folder / "support.safetensors")
    records = recognizer.predict([q for q, _ in queries], unknown=UnknownRule())
    windowed = recognizer.predict([recording], window=2.0, stride=0.5)[0]
    (folder / "predictions.json").write_text(json.dumps(recognizer.report(records + [windowed]), indent=1) + "\n")
    counts = [len(p) for p in parts]
    truth = true_segments(frame_times(recording, sum(counts)), counts, known[:3])
    timeline = timeline_figure(windowed, support.actions, out / "figures" / "timeline.png", truth=truth)
    annotated = annotate_recording(windowed, support.actions, folder / "recording_annotated.mp4", truth=truth)
    table = [
        {
            "query": f"{q.parent.name}/{q.name}",
            "truth": truth,
            "predicted": r["prediction"],
            "probability": r["probability"],
            "runner-up": r["top_k"][1][0],
            "score": r["score"],
            "threshold": r["threshold"],
        }
        for (q, truth), r in zip(queries, records, strict=False)
    ]
    return {
        "queries": table,
        "support_actions": len(known),
        "unseen_actions": len(outsiders),
        "score_name": records[0].get("score_name") if records else None,
        "temperature": support.calibration.temperature,
        "segments": windowed["segments"],
        "truth": truth,
        "disagreements": disagreements(windowed["segments"], truth),
        "recording": list(known[:3]),
        "annotated": annotated.relative_to(out).as_posix(),
        "timeline": timeline.relative_to(out).as_posix(),
        "files": str(folder),
    }


def true_segments(times: list[float], counts: list[int], actions: list[str]) -> list[dict]:
    """The segments of clips joined in order ({start, end, action}): clip k spans its frames' own times, from
    its first frame's to the end of its last (the next clip's first frame)."""
    segments, first = [], 0
    for count, action in zip(counts, actions, strict=True):
        end = round(frame_end(times, first + count - 1), 3)
        segments.append({"start": round(times[first], 3), "end": end, "action": action})
        first += count
    return segments


def _frames(manifest, path: str) -> int:
    return int(manifest.loc[manifest["path"] == path, "n_frames"].iloc[0])
