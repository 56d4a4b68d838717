"""`strm predict --stream`: a recording served live by FFmpeg on a loopback port gives the windows the
recording gives, a killed server is reconnected to and then the stream stops cleanly, a source that never
answers is one line, Ctrl-C leaves valid JSON lines, and segments close as the prediction changes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from pipeline.data.synth import write_mp4
from pipeline.data.video import ViewSpec, load_window
from pipeline.features.backbones import get_backbone
from pipeline.features.extract import ExtractSettings, fingerprint, recipe
from pipeline.heads import build_heads, save_heads
from pipeline.predict import FewShotRecognizer, PredictError, StreamLost, merge_segments
from pipeline.predict.live_segments import OpenSegments
from pipeline.predict.stream import window_view
from stages.app import app

REPO = Path(__file__).resolve().parents[1]
FFMPEG = "/usr/bin/ffmpeg" if Path("/usr/bin/ffmpeg").exists() else "ffmpeg"
SPEC = ViewSpec(short_side=40, crop=32, flip=False)
COLOURS = [(230, 40, 40), (40, 200, 60), (50, 80, 230)]
pytestmark = pytest.mark.usefixtures("one_thread")


def _clip(cls: int, seed: int, n: int) -> np.ndarray:
    """A square of the class's colour crossing a noisy background (even classes right, odd left)."""
    rng = np.random.default_rng([cls, seed])
    frames = np.clip(rng.integers(60, 140, (n, 1, 1, 3)) + rng.normal(0, 12, (n, 40, 48, 3)), 0, 255).astype(np.uint8)
    for t in range(n):
        x = int((t / (n - 1) if cls % 2 == 0 else 1 - t / (n - 1)) * 34)
        frames[t, 13:27, x : x + 14] = COLOURS[cls]
    return frames


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Random small strm heads on the `tiny` backbone's features (the recipe recorded), a support folder of
    2 actions x 2 clips, and a 4 s recording at 12 fps (2 s of each action)."""
    root = tmp_path_factory.mktemp("stream")
    backbone = get_backbone("tiny")
    manifest = pd.DataFrame({"video_id": ["v"], "class": ["a"], "split": ["test"], "path": ["v.mp4"]})
    torch.manual_seed(0)
    heads = build_heads("strm", backbone.dim, trm_dim=16)
    made = recipe(backbone, ExtractSettings(views=1, spec=SPEC), "fp32")
    save_heads(root / "heads.pt", heads, cache_fingerprint=fingerprint("toy", manifest, made))
    for cls in (0, 1):
        for i in range(2):
            (root / "support" / f"a{cls}").mkdir(parents=True, exist_ok=True)
            write_mp4(_clip(cls, i, 16), root / "support" / f"a{cls}" / f"v{i}.mp4")
    write_mp4(np.concatenate([_clip(0, 9, 24), _clip(1, 9, 24)]), root / "recording.mp4", fps=12)
    return root


def _recognizer(root: Path) -> FewShotRecognizer:
    # Batches of one window's 8 frames, as a stream's: the same kernels, so a recording's windows match bit for bit.
    recognizer = FewShotRecognizer.from_checkpoint(root / "heads.pt", device="cpu", workers=0, batch_size=8)
    recognizer.add_support(root / "support")
    return recognizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(video: Path, port: int, *, loop: bool = False) -> subprocess.Popen:
    """FFmpeg serving `video` at its own rate as MPEG-TS on 127.0.0.1:port, once it listens (`loop`: over
    and over, a stream that does not end by itself)."""
    again = ["-stream_loop", "-1"] if loop else []
    server = subprocess.Popen(
        [FFMPEG, "-nostdin", "-loglevel", "error", "-re", *again, "-i", str(video), "-c", "copy", "-f", "mpegts"]
        + [f"tcp://127.0.0.1:{port}?listen=1"]
    )
    state = f":{port:04X} 00000000:0000 0A"  # /proc/net/tcp: local port, no remote, LISTEN
    for _ in range(200):
        if state in Path("/proc/net/tcp").read_text() or server.poll() is not None:
            break
        time.sleep(0.025)
    return server


def test_a_window_view_is_load_windows_test_view(model, monkeypatch):
    """The stream's L frames of a window are load_window's over the same frames: the one sampling rule."""
    monkeypatch.setenv("STRM_DECODER", "pyav")
    path = model / "recording.mp4"
    with av.open(str(path)) as container:
        images = list(container.decode(video=0))
    for first, count in [(0, 48), (5, 12), (40, 8), (44, 3)]:
        want = load_window(path, first, count, SPEC)
        assert torch.equal(window_view(images[first : first + count], SPEC), want)


def test_a_served_recording_gives_the_recordings_windows(model, monkeypatch):
    """Served live over TCP, every window classified is the recording's window of the same start with its
    prediction and probabilities; the windows skipped (if the CPU falls behind) are counted."""
    monkeypatch.setenv("STRM_DECODER", "pyav")  # the stream decodes with PyAV: the same pixels
    recognizer = _recognizer(model)
    want = recognizer.predict(model / "recording.mp4", window=1.0, stride=0.5)[0]["windows"]
    port = _free_port()
    server = _serve(model / "recording.mp4", port)
    try:
        live = recognizer.stream(f"tcp://127.0.0.1:{port}", window=1.0, stride=0.5, reconnect=0)
        got = [w.record for w in live]
        rest = live.close()
    finally:
        server.kill()
    by_start = {w["start"]: w for w in want}
    assert len(got) >= 3 and len(got) + live.stats.skipped == len(want)
    for window in got:
        twin = by_start[window["start"]]
        assert (window["end"], window["frames"], window["prediction"]) == (
            twin["end"],
            twin["frames"],
            twin["prediction"],
        )
        for action, p in twin["probabilities"].items():
            assert window["probabilities"][action] == pytest.approx(p, abs=1e-4)
        assert window["top_k"][0][0] == window["prediction"] and window["latency_s"] >= 0
    summary = live.summary()
    assert summary["ended"] == "the source closed" and not summary["lost"] and summary["frames"] == 48
    assert summary["stream_s"] == pytest.approx(47 / 12, abs=1e-3) and summary["realtime_factor"] > 0
    assert rest and rest[-1]["end"] == pytest.approx(4.0, abs=1e-3)  # the segments the end closed


def test_a_killed_server_is_reconnected_then_the_stream_stops_cleanly(model, tmp_path):
    """Server killed mid-stream, a new one on the port: the stream goes on (time never going back), then the
    second one ends, no reconnect finds more, and the run stops with a valid JSON-lines file and exit 0."""
    recognizer = _recognizer(model)
    port = _free_port()
    servers = [_serve(model / "recording.mp4", port)]
    notices: list[str] = []
    windows = []
    try:
        live = recognizer.stream(
            f"tcp://127.0.0.1:{port}", window=1.0, stride=0.5, reconnect=3, backoff_s=0.3, on_notice=notices.append
        )
        for window in live:
            windows.append(window.record)
            if len(windows) == 2:
                servers[0].kill()
                servers[0].wait()
                servers.append(_serve(model / "recording.mp4", port))
        live.close()
    finally:
        for server in servers:
            server.kill()
    summary = live.summary()
    assert summary["reconnects"] == 1 and not summary["lost"], (summary, notices)
    assert summary["ended"].startswith("the source closed and 3 reconnect tries found no more")
    source = f"tcp://127.0.0.1:{port}: "
    assert source + "the source closed: reconnecting in 0.3 s (try 1 of 3)" in notices  # try 2 if the server was late
    assert any(n.startswith(source + "reconnected (try ") for n in notices)
    starts = [w["start"] for w in windows]
    assert starts == sorted(starts) and summary["stream_s"] > 4.0  # the second server's frames follow the first's


def test_a_file_still_being_written_is_followed_to_its_end(model, tmp_path):
    """FFmpeg writes MPEG-TS at the recording's rate while the stream reads it: every frame is read, and the
    stream ends cleanly once no data came for the timeout."""
    growing = tmp_path / "growing.ts"
    command = [FFMPEG, "-nostdin", "-loglevel", "error", "-re", "-i", str(model / "recording.mp4"), "-c", "copy"]
    writer = subprocess.Popen(command + ["-flush_packets", "1", "-f", "mpegts", str(growing)])
    try:
        for _ in range(200):
            if growing.exists() and growing.stat().st_size > 0:
                break
            time.sleep(0.025)
        live = _recognizer(model).stream(growing, window=1.0, stride=0.5, timeout_s=1.5)
        windows = [w.record for w in live]
    finally:
        writer.kill()
    summary = live.summary()
    assert summary["frames"] == 48 and not summary["lost"] and summary["ended"].startswith("the end of the file")
    assert len(windows) >= 2 and windows[-1]["end"] == pytest.approx(4.0, abs=1e-3)


def test_a_source_that_never_answers_is_one_line_and_a_valid_file(model, tmp_path):
    port = _free_port()  # nobody listens
    out = tmp_path / "lines.jsonl"
    args = ["predict", "--checkpoint", str(model / "heads.pt"), "--support", str(model / "support")]
    args += [
        "--stream",
        f"tcp://127.0.0.1:{port}",
        "--reconnect",
        "1",
        "--jsonl",
        str(out),
        "--device",
        "cpu",
        "--workers",
        "0",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert f"tcp://127.0.0.1:{port}: cannot open: Connection refused; 1 reconnect tries failed" in result.output
    (summary,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["kind"] == "summary" and summary["lost"] and summary["windows"] == 0
    with pytest.raises(PredictError, match="no such file"):
        _recognizer(model).stream(tmp_path / "absent.ts")
    with pytest.raises(StreamLost, match="Connection refused"):
        list(_recognizer(model).stream(f"tcp://127.0.0.1:{port}", reconnect=0))


def test_ctrl_c_stops_the_command_with_its_summary_and_valid_lines(model, tmp_path):
    """SIGINT to `strm predict --stream`: exit 0, every line JSON, the last one the summary."""
    long = tmp_path / "long.mp4"
    write_mp4(np.concatenate([_clip(k % 2, k, 24) for k in range(16)]), long, fps=12)  # 32 s
    port = _free_port()
    server = _serve(long, port, loop=True)  # it cannot end before the signal, however loaded the machine
    out = tmp_path / "lines.jsonl"
    command = [str(Path(sys.executable).with_name("strm")), "predict", "--checkpoint", str(model / "heads.pt")]
    command += ["--support", str(model / "support"), "--stream", f"tcp://127.0.0.1:{port}", "--window", "1"]
    command += ["--stride", "0.5", "--jsonl", str(out), "--device", "cpu", "--workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(2400):
            if out.exists() and out.read_text().count('"kind": "window"') >= 2 or run.poll() is not None:
                break
            time.sleep(0.05)
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=60)
    finally:
        run.kill()
        server.kill()
    assert run.returncode == 0, err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[-1]["kind"] == "summary" and lines[-1]["ended"] == "stopped" and lines[-1]["windows"] >= 2
    assert {line["kind"] for line in lines[:-1]} <= {"window", "segment"}
    assert "stopped" in err and "windows" in err


def _windows(labels: str, probability: float = 0.9) -> list[dict]:
    """Windows of 1 s every 0.5 s labelled by the letters of `labels` (- for a failed window)."""
    out = []
    for k, label in enumerate(labels):
        p = {a: (probability if a == label else (1 - probability) / 2) for a in "abc"}
        out.append({"start": k * 0.5, "end": k * 0.5 + 1, "prediction": None if label == "-" else label})
        out[-1].update(probability=p.get(label), probabilities={} if label == "-" else p)
    return out


@pytest.mark.parametrize("labels", ["aaaabbbbbbcccc", "aabaaaaccbcccaaa", "abababababab", "aaaa-bbbbaaab", "a"])
@pytest.mark.parametrize("min_length", [0.0, 1.0])
def test_segments_close_as_the_prediction_changes_and_agree_with_the_recordings(labels, min_length):
    """Closed one by one while the windows come, the segments are those of the whole recording at once."""
    windows = _windows(labels)
    segments = OpenSegments(min_length)
    closed = []
    for k, window in enumerate(windows):
        new = segments.add(window)
        assert all(s["end"] <= windows[k]["end"] for s in new)
        closed += new
    closed += segments.close()
    assert closed == merge_segments(windows, min_length)
    if min_length == 0 and labels == "aaaabbbbbbcccc":
        assert [s["prediction"] for s in closed] == ["a", "b", "c"]


def test_an_annotated_stream_has_every_frame_the_stream_had(model, tmp_path):
    """--stream with --annotate: the copy holds each frame read, at its stream time, drawn with the newest
    window's prediction; the JSON lines end with the summary."""
    from pipeline.predict.stream_lines import run_stream

    port = _free_port()
    server = _serve(model / "recording.mp4", port)
    try:
        live, lost, video = run_stream(
            _recognizer(model),
            f"tcp://127.0.0.1:{port}",
            tmp_path / "live.jsonl",
            annotate=tmp_path / "live.mp4",
            window=1.0,
            stride=0.5,
            reconnect=0,
        )
    finally:
        server.kill()
    assert lost is None and video == tmp_path / "live.mp4"
    lines = [json.loads(line) for line in (tmp_path / "live.jsonl").read_text().splitlines()]
    assert lines[-1]["kind"] == "summary" and lines[-1]["frames"] == 48
    with av.open(str(video)) as container:
        times = [frame.time for frame in container.decode(video=0)]
    assert len(times) == 48 and times[-1] - times[0] == pytest.approx(47 / 12, abs=0.01)
