"""A live stream kept up with: latency and real-time factor of `FewShotRecognizer.stream`.

A 640 x 360, 30 fps recording is served at its own rate by FFmpeg over TCP on 127.0.0.1 (MPEG-TS,
the H.264 copied); the stream is classified with tf_efficientnet_lite0 at 112 (the demo's recipe: last
block, 128/112, fp32 CPU) and strm heads against a saved 5-way 5-shot support index, windows of 2 s every
0.5 s, each window's JSON line written and flushed to a file as `strm predict --stream --jsonl` writes it.
Latency: from a window's last frame leaving the decoder to its line written. Real-time factor: the
reader's decoding seconds plus the classifier's seconds, per second of stream. One run gives both.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks import Figure
from pipeline.data.synth import write_mp4
from pipeline.data.video import ViewSpec
from pipeline.features.backbones import get_backbone
from pipeline.features.extract import ExtractSettings, fingerprint, recipe
from pipeline.heads import build_heads, save_heads
from pipeline.predict.recognizer import FewShotRecognizer
from pipeline.predict.stream_lines import write_line

SECONDS, FPS, WIDTH, HEIGHT = 40, 30, 640, 360
WINDOW, STRIDE, WAY, SHOT = 2.0, 0.5, 5, 5
SPEC = ViewSpec(short_side=128, crop=112, flip=False)


def _video(path: Path, frames: int, seed: int, size: tuple[int, int], fps: int) -> None:
    """Squares of seeded colours sliding over a soft gradient: a camera-like scene that encodes small."""
    rng = np.random.default_rng(seed)
    width, height = size
    base = np.linspace(40, 140, width, dtype=np.float32)[None, :, None] + np.zeros((height, 1, 3), np.float32)
    colours, speeds = rng.integers(60, 255, (3, 3)), rng.integers(2, 9, 3)
    video = np.empty((frames, height, width, 3), np.uint8)
    side = height // 4
    for t in range(frames):
        image = base.copy()
        for k in range(3):
            x, y = (speeds[k] * t + 97 * k) % (width - side), (side + 40 * k) % (height - side)
            image[y : y + side, x : x + side] = colours[k]
        video[t] = image.astype(np.uint8)
    write_mp4(video, path, fps=fps)


def _serve(video: Path) -> tuple[subprocess.Popen, int]:
    """FFmpeg serving `video` at its own rate on a free loopback port, once it listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-i", str(video), "-c", "copy", "-f", "mpegts"]
        + [f"tcp://127.0.0.1:{port}?listen=1"]
    )
    for _ in range(400):
        if f":{port:04X} 00000000:0000 0A" in Path("/proc/net/tcp").read_text() or server.poll() is not None:
            break
        time.sleep(0.025)
    return server, port


@functools.cache
def _run() -> dict[str, float | int | str]:
    """One served recording streamed through the recognizer: latencies to the written line, and the stats."""
    root = Path(tempfile.mkdtemp(prefix="bench_stream_"))
    try:
        for a in range(WAY):
            for i in range(SHOT):
                (root / "support" / f"action{a}").mkdir(parents=True, exist_ok=True)
                _video(root / "support" / f"action{a}" / f"clip{i}.mp4", 24, 10 * a + i, (160, 128), 12)
        _video(root / "recording.mp4", SECONDS * FPS, 99, (WIDTH, HEIGHT), FPS)
        backbone = get_backbone("tf_efficientnet_lite0", layer="last_block")
        manifest = pd.DataFrame({"video_id": ["v"], "class": ["a"], "split": ["test"], "path": ["v.mp4"]})
        made = recipe(backbone, ExtractSettings(views=1, spec=SPEC), "fp32")
        save_heads(
            root / "heads.pt",
            build_heads("strm", backbone.dim, trm_dim=320),
            cache_fingerprint=fingerprint("bench", manifest, made),
        )
        maker = FewShotRecognizer.from_checkpoint(root / "heads.pt", device="cpu", workers=2)
        maker.add_support(root / "support")
        index = maker.save_support(root / "support.safetensors")
        recognizer = FewShotRecognizer.from_checkpoint(root / "heads.pt", device="cpu", workers=2)
        recognizer.add_support(index)
        server, port = _serve(root / "recording.mp4")
        latencies = []
        try:
            live = recognizer.stream(f"tcp://127.0.0.1:{port}", window=WINDOW, stride=STRIDE, reconnect=0)
            with (root / "lines.jsonl").open("w") as out:
                for window in live:
                    write_line(out, window.record)
                    latencies.append(time.perf_counter() - window.arrived)
            live.close()
        finally:
            server.kill()
        s = live.summary()
        assert s["windows"] and not s["lost"], s
        return {
            "p95": float(np.percentile(latencies, 95)),
            "p50": round(float(np.percentile(latencies, 50)), 3),
            "rtf": (live.stats.decode_s + live.stats.classify_s) / live.stats.stream_s,
            "decode_s": round(live.stats.decode_s, 2),
            "classify_s": round(live.stats.classify_s, 2),
            "stream_s": round(live.stats.stream_s, 2),
            "windows": s["windows"],
            "skipped": s["skipped"],
            "frames": s["frames"],
            "load_1min": round(os.getloadavg()[0], 2),
            "torch_threads": torch.get_num_threads(),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _details(run: dict) -> dict[str, object]:
    return {
        "recording": f"{WIDTH}x{HEIGHT} {FPS} fps {SECONDS} s, H.264 as MPEG-TS over TCP (ffmpeg -re)",
        "model": f"tf_efficientnet_lite0 last_block 128/112 fp32 CPU, strm heads, {WAY}-way {SHOT}-shot index",
        "window": f"{WINDOW:g} s every {STRIDE:g} s",
        **{k: v for k, v in run.items() if k not in ("p95", "rtf")},
    }


def stream_latency_p95_s() -> Figure:
    """95th percentile of the seconds from a window's last frame arriving to its JSON line (goal <= 0.5)."""
    run = _run()
    return Figure(value=float(run["p95"]), unit="s", goal="<= 0.5", details=_details(run))


def stream_realtime_factor() -> Figure:
    """Processing seconds (decoding + classifying) per second of stream (goal <= 0.5)."""
    run = _run()
    return Figure(
        value=float(run["rtf"]), unit="x", goal="<= 0.5", details={"p95_latency_s": round(float(run["p95"]), 3)}
    )


BENCHES = {"stream_latency_p95_s": stream_latency_p95_s, "stream_realtime_factor": stream_realtime_factor}
