"""`strm predict`: raw clips through the checkpoint's recipe equal the cached path, uneven support, bad
clips reported and skipped, the support index, calibrated probabilities, windows of long recordings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from pipeline import evaluation as ev
from pipeline.data.synth import write_mp4
from pipeline.data.video import ViewSpec
from pipeline.evaluation.unknown import fit_temperature
from pipeline.features.backbones import get_backbone
from pipeline.features.cache import open_cache
from pipeline.features.extract import ExtractSettings, RunOptions, extract
from pipeline.predict.clips import PredictError
from pipeline.predict.outputs import merge_segments
from pipeline.predict.recognizer import FewShotRecognizer, UnknownRule
from pipeline.predict.windows import window_spans
from pipeline.training.train import make_config, train
from stages.app import app

SPEC = ViewSpec(short_side=40, crop=32)
COLOURS = [(230, 40, 40), (40, 200, 60), (50, 80, 230), (230, 200, 40), (200, 60, 220), (40, 210, 220), (250, 250, 250)]
CLASSES = {"train": range(0, 4), "test": range(4, 7)}


def _clip(cls: int, index: int, n: int) -> np.ndarray:
    """A square of the class's colour crossing a noisy background; even classes move right, odd left."""
    rng = np.random.default_rng([cls, index])
    frames = np.empty((n, 40, 48, 3), np.uint8)
    for t in range(n):
        image = np.clip(rng.integers(60, 140, size=3) + rng.normal(0, 12, (40, 48, 3)), 0, 255)
        step = t / (n - 1) if cls % 2 == 0 else 1 - t / (n - 1)
        x = int(step * 34)
        image[13:27, x : x + 14] = COLOURS[cls]
        frames[t] = image
    return frames


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Videos of 4 training and 3 test classes, their `tiny` cache, and heads trained on it for a few tasks."""
    root = tmp_path_factory.mktemp("predict")
    rows = []
    for split, classes in CLASSES.items():
        for c in classes:
            for i in range(5):
                rel = f"{split}/c{c}/v{i}.mp4"
                (root / "videos" / rel).parent.mkdir(parents=True, exist_ok=True)
                write_mp4(_clip(c, i, 12 + (i + c) % 5), root / "videos" / rel)
                rows.append(
                    {
                        "video_id": f"c{c}/v{i}",
                        "class": f"c{c}",
                        "split": split,
                        "path": rel,
                        "n_frames": -1,
                        "status": "ok",
                    }
                )
    manifest = pd.DataFrame(rows)
    cache = extract(
        "toy",
        manifest,
        get_backbone("tiny"),
        root / "cache",
        ExtractSettings(views=2, spec=SPEC),
        RunOptions(batch_size=32, workers=0),
        videos_root=root / "videos",
    ).path
    config = make_config(
        "frozen", episodes=6, way=2, shot=2, queries=1, val_every=0, device="cpu", heads_options={"trm_dim": 16}
    )
    heads = train(config, cache, root / "run").best_checkpoint
    return root, cache, heads


def _support(root: Path, folder: Path, layout: dict[str, list[int]]) -> Path:
    """SUPPORT/<action>/<clip> as symbolic links to the world's test videos of classes c<k>."""
    for action, picks in layout.items():
        (folder / action).mkdir(parents=True, exist_ok=True)
        cls = action.removeprefix("c")
        for i in picks:
            link = folder / action / f"v{i}.mp4"
            if not link.exists():
                os.symlink(root / "videos" / "test" / f"c{cls}" / f"v{i}.mp4", link)
    return folder


def test_raw_clips_give_evaluates_predictions_and_its_logits(world, tmp_path):
    """Tasks sampled by `evaluate`, laid out as support folders: the same predictions and logits
    within the float16 storage tolerance."""
    root, cache_path, heads_path = world
    cache = open_cache(cache_path)
    test = cache.load_split("test", views=1)
    recognizer = FewShotRecognizer.from_checkpoint(heads_path, device="cpu", workers=0)
    tasks = ev.sample_tasks(test.labels, episodes=3, way=3, shot=2, queries=2, seed=5)
    heads = recognizer.model
    for b in range(len(tasks)):
        task = ev.slice_tasks(tasks, slice(b, b + 1))
        want = ev.relate_tasks(heads, ev.embed_split(heads, test), task).logits[0]  # [n_q, way], labels in draw order
        ids = np.asarray(test.video_ids)
        names = [test.class_names[c] for c in task.classes[0]]
        folder = tmp_path / f"task{b}"
        for video, label in zip(task.support[0], task.support_labels[0], strict=False):
            target = root / "videos" / "test" / f"{ids[video]}.mp4"
            (folder / names[label]).mkdir(parents=True, exist_ok=True)
            os.symlink(target, folder / names[label] / f"{Path(ids[video]).name}.mp4")
        chosen = recognizer.add_support(folder)
        order = [chosen.actions.index(n) for n in names]  # evaluate's task label -> predict's action index
        records = recognizer.predict([root / "videos" / "test" / f"{ids[v]}.mp4" for v in task.query[0]])
        for q, record in enumerate(records):
            got = torch.tensor([record["logits"][chosen.actions[k]] for k in order])
            torch.testing.assert_close(got, want[q], rtol=1e-3, atol=1e-3)
            assert record["prediction"] == names[int(want[q].argmax())]


def test_uneven_support_bad_clips_and_odd_names(world, tmp_path):
    root, _, heads_path = world
    support = tmp_path / "support"
    for action, picks in {"c4": [0], "c5": [0, 1, 2], "c6 ünï": [0, 1]}.items():
        (support / action).mkdir(parents=True)
        for i in picks:
            os.symlink(root / "videos" / "test" / f"c{action[1]}" / f"v{i}.mp4", support / action / f"clip {i}.mp4")
    (support / "c5" / "empty.mp4").write_bytes(b"")
    recognizer = FewShotRecognizer.from_checkpoint(heads_path, device="cpu", workers=1)
    chosen = recognizer.add_support(support)
    assert chosen.actions == ["c4", "c5", "c6 ünï"] and len(chosen.used) == 6
    assert chosen.failed == [
        (str(support / "c5" / "empty.mp4"), f"{support / 'c5' / 'empty.mp4'}: empty file (0 bytes)")
    ]
    short = tmp_path / "quer ies" / "short ö.mp4"
    short.parent.mkdir()
    write_mp4(_clip(4, 9, 5), short)  # 5 frames: fewer than the 8 a view takes, so frames repeat
    good = root / "videos" / "test" / "c5" / "v4.mp4"
    records = recognizer.predict([good, short, tmp_path / "missing.mp4", short.parent])
    assert [r["status"] for r in records] == ["ok", "ok", "failed", "ok"]
    assert "5 frames" in records[1]["note"] and "repeated" in records[1]["note"] and "note" not in records[0]
    assert "no such file" in records[2]["reason"]
    assert records[0]["probability"] == pytest.approx(max(records[0]["probabilities"].values()))
    assert abs(sum(records[0]["probabilities"].values()) - 1) < 1e-6
    # An action left with no clip, and fewer than two actions, are errors that name them.
    (support / "c4" / "clip 0.mp4").unlink()
    (support / "c4" / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(PredictError, match="action\\(s\\) c4"):
        recognizer.add_support(support)
    lonely = _support(root, tmp_path / "lonely", {"c4": [0, 1]})
    with pytest.raises(PredictError, match="at least 2 actions"):
        recognizer.add_support(lonely)


def test_support_index_round_trip_and_refusals(world, tmp_path):
    root, cache, heads_path = world
    support = _support(root, tmp_path / "support", {"c4": [0, 1], "c5": [0, 1], "c6": [0, 1]})
    first = FewShotRecognizer.from_checkpoint(heads_path, device="cpu", workers=0)
    chosen = first.add_support(support)
    index = first.save_support(tmp_path / "support.safetensors")
    queries = [root / "videos" / "test" / f"c{c}" / "v3.mp4" for c in (4, 5, 6)]
    direct = first.predict(queries)
    again = FewShotRecognizer.from_checkpoint(heads_path, device="cpu", workers=0)
    loaded = again.add_support(index)
    assert loaded.actions == chosen.actions and loaded.calibration.temperature == chosen.calibration.temperature
    assert [r["logits"] for r in again.predict(queries)] == [r["logits"] for r in direct]
    other = train(
        make_config(
            "frozen",
            episodes=2,
            way=2,
            shot=2,
            queries=1,
            val_every=0,
            device="cpu",
            seed=1,
            heads_options={"trm_dim": 16},
        ),
        cache,
        tmp_path / "other",
    ).best_checkpoint
    with pytest.raises(PredictError, match="made with another checkpoint"):
        FewShotRecognizer.from_checkpoint(other, device="cpu", workers=0).add_support(index)
    (tmp_path / "fake.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(PredictError, match="not a support index"):
        again.add_support(tmp_path / "fake.safetensors")


def test_weights_other_than_the_recorded_ones_are_refused_unless_allowed(world, tmp_path):
    root, _, heads_path = world
    other = get_backbone("tiny")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    torch.save(other.trunk.state_dict(), tmp_path / "other.pt")
    with pytest.raises(PredictError, match="weights differ .*--allow-other-weights"):
        FewShotRecognizer.from_checkpoint(heads_path, weights=tmp_path / "other.pt", device="cpu")
    allowed = FewShotRecognizer.from_checkpoint(
        heads_path, weights=tmp_path / "other.pt", allow_other_weights=True, device="cpu", workers=0
    )
    assert any("--allow-other-weights" in n for n in allowed.notes)
    # A support index made through the other weights is refused with the recorded ones, and the reverse.
    allowed.add_support(_support(root, tmp_path / "support", {"c4": [0, 1], "c5": [0, 1]}))
    index = allowed.save_support(tmp_path / "other-weights.safetensors")
    with pytest.raises(PredictError, match="other backbone weights"):
        FewShotRecognizer.from_checkpoint(heads_path, device="cpu", workers=0).add_support(index)


def test_options_that_cannot_work_fail_before_decoding(world, tmp_path):
    root, _, heads_path = world
    recognizer = FewShotRecognizer.from_checkpoint(heads_path, device="cpu", workers=0)
    single = recognizer.add_support(_support(root, tmp_path / "single", {"c4": [0], "c5": [0]}))
    assert single.calibration.temperature == 1.0 and any("no action has 2 support clips" in n for n in recognizer.notes)
    query = root / "videos" / "test" / "c5" / "v4.mp4"
    with pytest.raises(PredictError, match="--unknown needs .* 2 clips"):
        recognizer.predict([query], unknown=UnknownRule())
    assert recognizer.predict([query])[0]["status"] == "ok"  # without --unknown one clip an action is enough
    with pytest.raises(PredictError, match="--stride needs --window"):
        recognizer.predict([query], stride=0.5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PredictError, match="no query videos in"):
        recognizer.predict([tmp_path / "empty"])
    record = recognizer.predict([query], window=0.25)[0]  # 3 frames at 12 fps: fewer than a view samples
    assert record["status"] == "ok" and record["windows"] == [] and "at least 8" in record["windows_reason"]
    cli = CliRunner().invoke(
        app,
        [
            "predict",
            "--checkpoint",
            str(heads_path),
            "--support",
            str(tmp_path / "single"),
            str(query),
            "--device",
            "cpu",
            "--workers",
            "0",
        ],
    )
    assert cli.exit_code == 0 and "note: no action has 2 support clips" in cli.output, cli.output


def test_unknown_verdict_follows_the_score_and_threshold(world, tmp_path):
    root, _, heads_path = world
    recognizer = FewShotRecognizer.from_checkpoint(heads_path, device="cpu", workers=0)
    recognizer.add_support(_support(root, tmp_path / "support", {"c4": [0, 1, 2], "c5": [0, 1, 2]}))
    queries = [root / "videos" / "test" / f"c{c}" / f"v{i}.mp4" for c in (4, 5, 6) for i in (3, 4)]
    strict = recognizer.predict(queries, unknown=UnknownRule(0.95))  # rejects 95% of the support's own clips
    assert all((r["prediction"] == "unknown") == (r["score"] < r["threshold"]) for r in strict)
    assert all(r["action"] in ("c4", "c5") for r in strict) and any(r["prediction"] == "unknown" for r in strict)
    plain = recognizer.predict(queries)
    assert [r["action"] for r in strict] == [r["prediction"] for r in plain]


def test_long_recording_windows_segments_timeline_and_cli_json(world, tmp_path):
    root, _, heads_path = world
    support = _support(root, tmp_path / "support", {"c4": [0, 1, 2], "c5": [0, 1, 2], "c6": [0, 1, 2]})
    recording = tmp_path / "recording.mp4"
    write_mp4(np.concatenate([_clip(4, 7, 24), _clip(6, 7, 24)]), recording, fps=12)  # 2 s of c4, then 2 s of c6
    out = tmp_path / "out.json"
    result = CliRunner().invoke(
        app,
        [
            "predict",
            "--checkpoint",
            str(heads_path),
            "--support",
            str(support),
            str(recording),
            str(root / "videos" / "test" / "c5"),
            "--window",
            "1",
            "--stride",
            "0.5",
            "--json",
            str(out),
            "--csv",
            str(tmp_path / "out.csv"),
            "--figures",
            str(tmp_path / "fig"),
            "--unknown",
            "auto",
            "--device",
            "cpu",
            "--workers",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert {"checkpoint", "recipe", "actions", "support", "queries"} <= set(report)
    assert {"used", "failed", "ignored", "leave_one_out"} <= set(report["support"])
    assert len(report["support"]["used"]) == 9
    first = report["queries"][0]
    assert {"path", "status", "reason", "prediction", "probability", "probabilities", "top_k", "logits"} <= set(first)
    assert [(w["start"], w["end"]) for w in first["windows"]][:3] == [(0.0, 1.0), (0.5, 1.5), (1.0, 2.0)]
    assert len(first["windows"]) == 7 and first["segments"] and first["timeline"].endswith("_timeline.png")
    assert Path(first["timeline"]).stat().st_size > 5000
    assert first["threshold"] is not None and "score" in first
    # Windows keep the underlying action, score and threshold (an unknown one too), in the JSON and the CSV.
    assert all({"action", "score", "threshold"} <= set(w) for w in first["windows"])
    table = pd.read_csv(tmp_path / "out.csv")
    assert len(report["queries"]) == 1 + 5
    cut = [q for q in report["queries"] if len(q["windows"]) > 1]  # a clip within one window reads as a clip
    assert (table["kind"] == "clip").sum() == len(report["queries"]) - len(cut)
    assert (table["kind"] == "window").sum() == sum(len(q["windows"]) for q in cut)
    assert (table["kind"] == "segment").sum() == sum(len(q["segments"]) for q in cut)
    assert table.loc[table["kind"] == "window", ["action", "score", "threshold"]].notna().all().all()


def test_proto_needs_no_training_but_a_backbone(world, tmp_path):
    root, _, _ = world
    with pytest.raises(PredictError, match="--backbone"):
        FewShotRecognizer.from_checkpoint("proto", device="cpu")
    support = _support(root, tmp_path / "support", {"c4": [0, 1], "c5": [0, 1]})
    recognizer = FewShotRecognizer.from_checkpoint("proto", backbone="tiny", device="cpu", workers=0)
    assert recognizer.maker.recipe.backbone == "tiny"
    recognizer.add_support(support)
    records = recognizer.predict([root / "videos" / "test" / "c5" / "v4.mp4"], unknown=UnknownRule(0.1))
    assert records[0]["status"] == "ok" and set(records[0]["probabilities"]) == {"c4", "c5"}


def test_windows_and_segments_and_temperature():
    at = lambda n, fps: [k / fps for k in range(n)]  # noqa: E731 - a constant frame rate's timestamps
    assert [(f, c) for f, c, _, _ in window_spans(at(100, 10.0), 2.0, 1.0)] == [(10 * k, 20) for k in range(9)]
    assert window_spans(at(12, 10.0), 2.0, 1.0) == [(0, 12, 0.0, 1.2)]
    # A stride that does not reach the end adds one window ending at the last frame: nothing goes unclassified.
    assert window_spans(at(59, 10.0), 2.0, 2.0) == [(0, 20, 0.0, 2.0), (20, 20, 2.0, 4.0), (39, 20, 3.9, 5.9)]
    windows = [
        {"start": 0, "end": 1, "prediction": "a", "probability": 0.8},
        {"start": 0.5, "end": 1.5, "prediction": "a", "probability": 0.6},
        {"start": 1, "end": 2, "prediction": None, "probability": None},
        {"start": 1.5, "end": 2.5, "prediction": "b", "probability": 0.9},
    ]
    # Each window owns the time up to halfway to its neighbours' centres; a window that failed owns a gap.
    assert [{k: s[k] for k in ("start", "end", "prediction", "probability")} for s in merge_segments(windows)] == [
        {"start": 0, "end": 1.25, "prediction": "a", "probability": 0.7},
        {"start": 1.75, "end": 2.5, "prediction": "b", "probability": 0.9},
    ]
    # T is the brute-force minimiser of the (Laplace-smoothed) negative log-likelihood, finite when all are right.
    logits = torch.tensor([[-1.0, -9.0, -12.0], [-20.0, -2.0, -15.0], [-7.0, -8.0, -3.0], [-4.0, -3.0, -30.0]])
    labels = torch.tensor([0, 1, 2, 0])
    t = fit_temperature(logits, labels)
    grid = np.exp(np.linspace(np.log(0.01), np.log(100), 20001))
    smoothing = 3 / (2 * 6)
    losses = [float(torch.nn.functional.cross_entropy(logits / g, labels, label_smoothing=smoothing)) for g in grid]
    assert t == pytest.approx(grid[int(np.argmin(losses))], rel=2e-3)
    assert 0 < fit_temperature(logits[:3], labels[:3]) < 1e3  # all held-out clips right: still finite
