"""Training: does reading the feature cache slow training down, and how fast does the streamed reader deliver?

train_loading_fraction feeds the same training run (frozen preset, STRM heads, 5-way 5-shot, 4
queries a class, D = 320 as tf_efficientnet_lite0's last block, 4 cached views a video) two ways:
- ram: `train` loads the split from the Zarr cache into RAM, then gathers each task there;
- stream: `train` reads each task's videos from the Zarr cache, background threads reading ahead.
Each side's rate is its steady state: the tasks from WARMUP to WARMUP + TIMED over the time between
the loop's progress reports at those tasks (setup, statistics and loading are reported apart). The
sides take turns, twice, and each keeps its best round, so a busy spell on a shared machine does
not land on one side only.

cache_stream_gb_per_s is the streamed reader alone at the paper's width (D = 2048, 4 views): the
task inputs of many tasks read as training reads them (`task_inputs`, threads reading ahead),
in bytes of features delivered a second; each video's chunk holds all 4 views, so 4x that is decoded.

Either cache was just written, so it is in the OS page cache: this measures Zarr's decoding and
the read-ahead, not the disk.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks import Figure, steady_rate

DIM, VIEWS, WARMUP, TIMED, ROUNDS = 320, 4, 10, 100, 2
SPLITS = {"train": (20, 10, VIEWS)}  # 200 videos: 20 classes x 10, 65 MB as float16
STREAM_DIM, STREAM_SPLITS, STREAM_TASKS = 2048, {"train": (10, 10, VIEWS)}, 60  # 100 videos, 210 MB


def train_loading_fraction() -> Figure:
    """Steady-state tasks/s streaming from the Zarr cache divided by tasks/s from the split in RAM."""
    from pipeline.features.copies import write_random_cache
    from pipeline.training.train import make_config, train

    best: dict[str, float] = {}
    setup: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp)
        cache = write_random_cache(root / "cache", splits=SPLITS, dim=DIM)
        episodes = WARMUP + TIMED
        for round_ in range(ROUNDS):
            for side in ("ram", "stream"):
                config = make_config(
                    "frozen", episodes=episodes, val_every=0, checkpoint_every=episodes, loading=side, device="cpu"
                )
                stamps: list[tuple[float, int]] = []
                start = time.perf_counter()
                train(
                    config,
                    cache,
                    root / f"{side}-{round_}",
                    progress=lambda p, stamps=stamps: stamps.append((time.perf_counter(), p.task)),
                )
                best[side] = max(best.get(side, 0.0), steady_rate(stamps, WARMUP, WARMUP + TIMED))
                setup[side] = min(setup.get(side, float("inf")), stamps[0][0] - start)
    return Figure(
        value=best["stream"] / best["ram"],
        unit="x",
        goal=">= 0.9",
        details={
            "setup": f"strm heads, 5-way 5-shot 4 queries, D={DIM}, {VIEWS} views, "
            f"{sum(c * v for c, v, _ in SPLITS.values())} training videos, CPU, {torch.get_num_threads()} threads; "
            f"tasks {WARMUP}..{WARMUP + TIMED} timed, best of {ROUNDS} rounds",
            "ram_tasks_per_s": round(best["ram"], 3),
            "stream_tasks_per_s": round(best["stream"], 3),
            "setup_s (open, load, statistics) ram, stream": (round(setup["ram"], 2), round(setup["stream"], 2)),
        },
    )


def cache_stream_gb_per_s() -> Figure:
    """GB/s of features the streamed reader delivers to training at D = 2048 (one view of each video)."""
    from pipeline.data.episodes import EpisodeSampler
    from pipeline.features.cache import open_cache
    from pipeline.features.copies import write_random_cache
    from pipeline.training.train import task_inputs

    with tempfile.TemporaryDirectory(prefix="bench_stream_") as tmp:
        cache = open_cache(write_random_cache(Path(tmp) / "cache", splits=STREAM_SPLITS, dim=STREAM_DIM))
        split = cache.split("train", loading="stream")
        sampler = EpisodeSampler(split.labels.numpy(), way=5, shot=5, queries=4, seed=0, views=VIEWS)
        rates: dict[str, tuple[float, float]] = {}
        for name, read_ahead in (("sequential", 1), ("read ahead (as training)", 8)):
            delivered = 0
            start = time.perf_counter()
            for _, _, x in task_inputs(sampler, list(range(STREAM_TASKS)), split, read_ahead=read_ahead):
                delivered += x.numel() * x.element_size()
            seconds = time.perf_counter() - start
            rates[name] = (delivered / seconds / 1e9, STREAM_TASKS / seconds)
    gb_s, tasks_s = rates["read ahead (as training)"]
    view_mb = 8 * 16 * STREAM_DIM * 2 / 1e6
    return Figure(
        value=gb_s,
        unit="GB/s",
        goal="what a GPU trains on: 250 tasks/s x 45 views of 0.52 MB = 5.9 GB/s",
        details={
            "setup": f"{sum(c * n for c, n, _ in STREAM_SPLITS.values())} videos x {VIEWS} views x 8 x 16 x {STREAM_DIM} "
            f"float16 (a view {view_mb:.2f} MB, a chunk {VIEWS * view_mb:.1f} MB), 5-way 5-shot 4 queries, "
            f"{STREAM_TASKS} tasks, page cache warm, {torch.get_num_threads()} threads",
            "tasks_per_s (read ahead)": round(tasks_s, 2),
            "sequential GB/s, tasks/s": tuple(round(v, 3) for v in rates["sequential"]),
            "chunk bytes decoded GB/s (all views of each video)": round(VIEWS * gb_s, 3),
        },
    )


BENCHES = {"train_loading_fraction": train_loading_fraction, "cache_stream_gb_per_s": cache_stream_gb_per_s}
