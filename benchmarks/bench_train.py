"""Training: does reading the feature cache slow training down?

Three ways to feed the same training run (frozen preset, STRM heads, 5-way 5-shot, 4 queries a
class, D = 320 as tf_efficientnet_lite0's last block, 4 cached views a video):
- memory: the split's tensors are already in memory (handed to `train`), the upper bound;
- ram: `train` loads the split from the Zarr cache on disk into RAM, then trains;
- stream: `train` reads each task's videos from the Zarr cache, background threads reading ahead.
Each side's rate is tasks / wall time of the whole `train` call (setup, statistics and loading
included). The sides take turns, three times, and each keeps its best round, so a busy spell on a
shared machine does not land on one side only. The cache was just written, so it is in the OS
page cache: this measures Zarr's decoding and the read-ahead, not the disk.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks import Figure

DIM, VIEWS, TASKS, ROUNDS = 320, 4, 10, 3
SPLITS = {"train": (20, 10, VIEWS)}  # 200 videos: 20 classes x 10, 65 MB as float16


def train_loading_fraction() -> Figure:
    """min(ram, stream) tasks/s divided by tasks/s from tensors already in memory."""
    from pipeline.cache import open_cache, write_random_cache
    from pipeline.train import make_config, train

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp)
        cache = write_random_cache(root / "cache", splits=SPLITS, dim=DIM)
        preloaded = open_cache(cache).load_split("train")
        best: dict[str, float] = {}
        for round_ in range(ROUNDS):
            for side in ("memory", "ram", "stream"):
                config = make_config("frozen", episodes=TASKS, val_every=0, checkpoint_every=TASKS,
                                     loading="stream" if side == "stream" else "ram", device="cpu")
                start = time.perf_counter()
                train(config, cache, root / f"{side}-{round_}", train_split=preloaded if side == "memory" else None)
                rate = TASKS / (time.perf_counter() - start)
                best[side] = max(best.get(side, 0.0), rate)
    ram, stream = best["ram"] / best["memory"], best["stream"] / best["memory"]
    return Figure(
        value=min(ram, stream),
        unit="x",
        goal=">= 0.9",
        details={
            "setup": f"strm heads, 5-way 5-shot 4 queries, D={DIM}, {VIEWS} views, {TASKS} tasks a run, "
                     f"{sum(c * v for c, v, _ in SPLITS.values())} training videos, CPU, {torch.get_num_threads()} threads",
            "memory_tasks_per_s": round(best["memory"], 3),
            "ram_tasks_per_s": round(best["ram"], 3),
            "stream_tasks_per_s": round(best["stream"], 3),
            "ram_fraction": round(ram, 3),
            "stream_fraction": round(stream, 3),
        },
    )


BENCHES = {"train_loading_fraction": train_loading_fraction}
