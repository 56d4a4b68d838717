"""Prediction's overhead over extraction, in the same run.

Both sides turn the same query clips into tf_efficientnet_lite0 features at 112 (the demo's
recipe: last block, 128/112) with the same decoding workers and batch size: the extraction side
through `pipeline.features.extract.extract` into a fresh cache, the prediction side through
`FewShotRecognizer.predict` against a saved 5-way 5-shot support index (so no support clip is
decoded), heads encoding and relating the queries included. The two alternate and each side's
best of `ROUNDS` is kept, as the CPU is shared.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks import Figure
from pipeline.data.synth import write_mp4
from pipeline.data.video import ViewSpec
from pipeline.features.backbones import get_backbone
from pipeline.features.extract import (
    ExtractSettings,
    RunOptions,
    extract,
    fingerprint,
    recipe,
)
from pipeline.heads import build_heads, save_heads
from pipeline.predict.recognizer import FewShotRecognizer

QUERIES, ROUNDS, WORKERS, FRAMES = 40, 2, 2, 24
SPEC = ViewSpec(short_side=128, crop=112, flip=False)


def _clip(path: Path, seed: int) -> None:
    """A moving bright square on noise, 128 x 128, 24 frames: the synthetic benchmark's size."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 120, (FRAMES, 128, 128, 3), dtype=np.uint8)
    for t in range(FRAMES):
        x = (seed * 7 + 4 * t) % 96
        frames[t, 40:72, x : x + 32] = 230
    write_mp4(frames, path)


def predict_overhead_vs_extract() -> Figure:
    """predict time / extract time for the same query clips (goal <= 1.15)."""
    root = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    try:
        support = [root / "support" / f"action{a}" / f"clip{i}.mp4" for a in range(5) for i in range(5)]
        queries = [root / "queries" / f"q{k:03d}.mp4" for k in range(QUERIES)]
        for k, path in enumerate(support + queries):
            path.parent.mkdir(parents=True, exist_ok=True)
            _clip(path, k)
        backbone = get_backbone("tf_efficientnet_lite0", layer="last_block")
        settings = ExtractSettings(views=1, spec=SPEC)
        manifest = pd.DataFrame(
            {
                "video_id": [q.stem for q in queries],
                "class": "query",
                "split": "test",
                "path": [str(q) for q in queries],
                "n_frames": FRAMES,
                "status": "ok",
            }
        )
        heads = build_heads("strm", backbone.dim, trm_dim=320)
        save_heads(
            root / "heads.pt",
            heads,
            cache_fingerprint=fingerprint("bench", manifest, recipe(backbone, settings, "fp32")),
        )
        maker = FewShotRecognizer.from_checkpoint(root / "heads.pt", device="cpu", workers=WORKERS)
        maker.add_support(root / "support")
        index = maker.save_support(root / "support.safetensors")
        recognizer = FewShotRecognizer.from_checkpoint(root / "heads.pt", device="cpu", workers=WORKERS)
        times: dict[str, list[float]] = {"extract": [], "predict": []}
        for r in range(ROUNDS):
            start = time.perf_counter()
            extract(
                "bench", manifest, backbone, root / f"cache{r}", settings, RunOptions(workers=WORKERS, device="cpu")
            )
            times["extract"].append(time.perf_counter() - start)
            start = time.perf_counter()
            recognizer.add_support(index)
            records = recognizer.predict(queries)
            times["predict"].append(time.perf_counter() - start)
            assert all(rec["status"] == "ok" for rec in records)
        best = {k: min(v) for k, v in times.items()}
        return Figure(
            value=best["predict"] / best["extract"],
            unit="x",
            goal="<= 1.15",
            details={
                "queries": QUERIES,
                "extract_s": round(best["extract"], 2),
                "predict_s": round(best["predict"], 2),
                "queries_per_s": round(QUERIES / best["predict"], 2),
                "workers": WORKERS,
                "recipe": "tf_efficientnet_lite0 last_block, 128/112, fp32 CPU",
            },
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


BENCHES = {"predict_overhead_vs_extract": predict_overhead_vs_extract}
