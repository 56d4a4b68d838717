"""`strm predict --annotate`: the annotated video has the input's frame count and timing (a phone's variable
frame rate too, with either encoder), shows the window in effect at each frame's time and the timeline strip;
the timeline PNG with true segments, and where predicted and true segments disagree."""

from __future__ import annotations

from pathlib import Path

import av
import matplotlib.image as mpimg
import numpy as np
import pytest
from typer.testing import CliRunner
from vfr_video import VFR_TIMES, write_vfr_video
from video_factory import write_test_video

from pipeline.data.video import count_frames, frame_times
from pipeline.predict import annotate as annotate_module
from pipeline.predict.annotate import (
    Annotator,
    FrameState,
    Timeline,
    annotate_clip,
    annotate_recording,
    states_in_effect,
)
from pipeline.predict.outputs import UNKNOWN_COLOUR, action_colours, disagreements, timeline_figure
from stages.app import app

ACTIONS = ["a_then_b", "b_then_a", "c"]
pytestmark = pytest.mark.usefixtures("one_thread")


def _windows(n: int, labels: list[str]) -> list[dict]:
    """Windows of 2 s every 0.5 s, window k predicting labels[k] with probability 0.6."""
    windows = []
    for k in range(n):
        probabilities = dict.fromkeys(ACTIONS, 0.2) | {labels[k]: 0.6} if labels[k] in ACTIONS else {}
        windows.append(
            {
                "start": k * 0.5,
                "end": k * 0.5 + 2,
                "frames": 24,
                "prediction": labels[k],
                "probability": 0.6,
                "probabilities": probabilities,
            }
        )
    return windows


def _recording(path: Path) -> dict:
    """A 5 s recording's record: windows a, a, a, b, b, b, b; segments a 0-2.25 s, b 2.25-5 s."""
    windows = _windows(7, ["a_then_b"] * 3 + ["b_then_a"] * 4)
    segments = [
        {"start": 0.0, "end": 2.25, "prediction": "a_then_b"},
        {"start": 2.25, "end": 5.0, "prediction": "b_then_a"},
    ]
    return {"path": str(path), "status": "ok", "windows": windows, "segments": segments}


def _decoded(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(container.streams.video[0])]


@pytest.mark.parametrize("encoder", ["libx264", "mpeg4"])
def test_annotated_video_keeps_the_frame_count_and_variable_timing(tmp_path, monkeypatch, encoder):
    source = write_vfr_video(tmp_path / "phone.mp4", VFR_TIMES)
    monkeypatch.setattr(annotate_module, "_encoder", lambda: encoder)
    record = {"path": str(source), "status": "ok", "prediction": "c", "probability": 0.7, "top_k": [["c", 0.7]]}
    out = annotate_clip(record, ACTIONS, tmp_path / "out" / "phone_annotated.mp4")
    assert count_frames(out) == count_frames(source) == len(VFR_TIMES)
    assert frame_times(out) == pytest.approx(frame_times(source), abs=1e-3)
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == ("h264" if encoder == "libx264" else "mpeg4")
        assert (stream.width, stream.height) == (64 * 8, 48 * 8)  # enlarged by a whole factor to >= 360 px
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # the temporary file is gone


def test_recording_shows_the_window_in_effect_and_the_timeline_with_its_cursor(tmp_path):
    source = write_test_video(tmp_path / "recording.mp4", 60, size=(128, 96), fps=12)  # 5 s
    record = _recording(source)
    truth = [{"start": 0.0, "end": 2.5, "action": "a_then_b"}, {"start": 2.5, "end": 5.0, "action": "c"}]
    at = states_in_effect(record, truth)
    # Windows own the time to halfway between their centres (1.0, 1.5, 2.0, 2.5, ...), as segments are cut.
    assert [at(t).prediction for t in (0.0, 2.2, 2.3, 4.9)] == ["a_then_b", "a_then_b", "b_then_a", "b_then_a"]
    assert at(0.0).top_k[0] == ("a_then_b", 0.6) and at(0.0).timeline.duration == 5.0
    out = annotate_recording(record, ACTIONS, tmp_path / "annotated.mp4", truth=truth)
    frames = _decoded(out)
    assert len(frames) == count_frames(source) == 60
    height, width = frames[0].shape[:2]
    assert (height, width) == (96 * 4, 128 * 4)
    colours = {a: np.array(c) * 255 for a, c in action_colours(ACTIONS).items()}

    def near(pixel: np.ndarray, colour: np.ndarray) -> bool:
        return bool(np.abs(pixel.astype(float) - colour).max() < 60)

    frame = frames[6]  # 0.5 s. The strip's rows: true (upper), predicted (lower, its middle 6 px from the bottom)
    predicted_row = frame[height - 6]
    assert near(predicted_row[round(1.0 / 5 * width)], colours["a_then_b"])
    assert near(predicted_row[round(4.0 / 5 * width)], colours["b_then_a"])
    column = frame[height - 40 :, round(3.6 / 5 * width)].astype(float)
    assert (np.abs(column - colours["c"]).max(1) < 60).sum() > 3  # the true row shows c where b_then_a is predicted
    for k, t in ((24, 2.0), (48, 4.0)):  # the cursor: a white line at the frame's time (the row names end before)
        white = np.flatnonzero(frames[k][height - 6, 100:].mean(-1) > 200) + 100
        assert len(white) and abs(white.mean() - t / 5 * width) < 6


def test_annotator_writes_nothing_on_failure_and_names_a_bad_suffix(tmp_path):
    out = tmp_path / "live.mp4"
    state = FrameState("unknown", 0.4, (("c", 0.4), ("a_then_b", 0.3)), Timeline(2.0, ((0.0, 2.0, "unknown"),)))
    with pytest.raises(RuntimeError, match="stream stopped"):
        with Annotator(out, 64, 48, 10, ACTIONS) as annotator:
            annotator.write(np.zeros((48, 64, 3), np.uint8), 0.0, state)
            raise RuntimeError("stream stopped")
    assert list(tmp_path.iterdir()) == []
    with Annotator(out, 64, 48, 10, ACTIONS) as annotator:
        for k in range(5):
            annotator.write(np.full((48, 64, 3), 40 * k, np.uint8), k / 10, state)
        with pytest.raises(ValueError, match="expected"):
            annotator.write(np.zeros((48, 65, 3), np.uint8), 0.5, state)
    assert count_frames(out) == 5 and frame_times(out) == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4], abs=1e-3)
    with pytest.raises(OSError, match="suffix") as caught:
        Annotator(tmp_path / "video.nosuchformat", 64, 48, 10, ACTIONS)
    assert caught.value.filename == str(tmp_path / "video.nosuchformat")


def test_disagreements_colours_and_the_timeline_figure_with_truth(tmp_path):
    segments = [
        {"start": 0.0, "end": 2.25, "prediction": "a_then_b"},
        {"start": 2.25, "end": 3.0, "prediction": "unknown"},
        {"start": 3.5, "end": 5.0, "prediction": "c"},
    ]
    truth = [{"start": 0.0, "end": 2.5, "action": "a_then_b"}, {"start": 2.5, "end": 5.0, "action": "c"}]
    assert disagreements(segments, truth) == [
        {"start": 2.25, "end": 2.5, "predicted": "unknown", "truth": "a_then_b"},
        {"start": 2.5, "end": 3.0, "predicted": "unknown", "truth": "c"},
        {"start": 3.0, "end": 3.5, "predicted": None, "truth": "c"},
    ]
    assert disagreements([{"start": 0.0, "end": 2.5, "prediction": "a_then_b"}], truth[:1]) == []
    colours = action_colours([f"action{k}" for k in range(20)])
    assert len(set(colours.values())) == 18 and UNKNOWN_COLOUR not in colours.values()  # grey is unknown's
    record = _recording(tmp_path / "r.mp4")
    path = timeline_figure(record, ACTIONS, tmp_path / "timeline.png", truth=truth)
    assert path.stat().st_size > 10_000 and mpimg.imread(path).std() > 0.02


def test_cli_annotates_a_clip_and_a_recording(tmp_path):
    for action in ("left", "right"):
        for k in range(2):
            write_test_video(tmp_path / "support" / action / f"v{k}.mp4", 10 + 3 * k + (action == "right"))
    clip = write_test_video(tmp_path / "queries" / "clip.mp4", 9)
    recording = write_test_video(tmp_path / "queries" / "recording.mp4", 48, fps=12)  # 4 s
    base = ["predict", "--checkpoint", "proto", "--backbone", "tiny", "--support", str(tmp_path / "support")]
    base += ["--device", "cpu", "--workers", "0", "--figures", str(tmp_path / "figures")]
    args = [*base, str(clip), str(recording), "--window", "1", "--annotate", str(tmp_path / "out" / "seen.mp4")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    written = {p.name: p for p in (tmp_path / "out").iterdir()}
    assert set(written) == {"seen-clip.mp4", "seen-recording.mp4"}
    assert count_frames(written["seen-clip.mp4"]) == 9 and count_frames(written["seen-recording.mp4"]) == 48
    assert frame_times(written["seen-recording.mp4"]) == pytest.approx(frame_times(recording), abs=1e-3)
    result = CliRunner().invoke(app, [*base, str(clip), "--annotate", str(tmp_path / "one.mp4")])
    assert result.exit_code == 0, result.output
    assert count_frames(tmp_path / "one.mp4") == 9
