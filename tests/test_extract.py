"""Feature extraction into the cache: values, failures, resume after kill -9, and a 2-rank torchrun run.

Everything runs the `tiny` backbone on 64 x 48 videos cut to 32 x 32 crops, so the whole file
stays small on a shared 2-core CPU.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from faults import kill_at_random, kills_from_env, seed_from_env, timed_run
from typer.testing import CliRunner
from video_factory import read_index, write_test_video

from pipeline.data.video import ShortVideo, ViewSpec, load_view
from pipeline.features.backbones import Backbone, get_backbone, patch_features
from pipeline.features.cache import open_cache
from pipeline.features.extract import ExtractSettings, RunOptions, VideoJob, decode_job, extract
from pipeline.runtime.distributed import resolve_precision
from stages.app import app

REPO = Path(__file__).resolve().parents[1]
SPEC = ViewSpec(short_side=40, crop=32)  # tiny's map is then 4 x 4


def _videos(root: Path, n_train: int, n_test: int) -> pd.DataFrame:
    """Tiny videos of varied lengths in two classes per split, and their manifest (paths relative to root)."""
    rows = []
    for i in range(n_train + n_test):
        split = "train" if i < n_train else "test"
        cls = f"{split}_{i % 2}"
        rel = f"{cls}/v{i:02d}.mp4"
        n_frames = 12 + 3 * i
        write_test_video(root / rel, n_frames)
        rows.append(
            {
                "video_id": f"{cls}/v{i:02d}",
                "class": cls,
                "split": split,
                "path": rel,
                "n_frames": n_frames if i % 2 else -1,
                "status": "ok",
            }
        )
    return pd.DataFrame(rows)


def _expected(path: Path, n_frames: int, video_id: str, view: int, patches: int) -> torch.Tensor:
    """Features of one view computed directly: normalise, tiny, P x P max windows, row-major patches."""
    backbone = get_backbone("tiny")
    x = (load_view(path, n_frames, video_id, view, 0, SPEC).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        fmap = backbone(x)  # [8, 64, 4, 4]
    k = fmap.shape[-1] // patches
    pooled = fmap.view(8, 64, patches, k, patches, k).amax(dim=(3, 5))  # [8, 64, P, P]
    return pooled.reshape(8, 64, patches * patches).transpose(1, 2).half()


def test_features_are_the_pooled_backbone_maps_of_each_view(tmp_path):
    manifest = _videos(tmp_path / "videos", n_train=3, n_test=2)
    settings = ExtractSettings(views=2, spec=SPEC, patches=2)
    seen = []
    result = extract(
        "toy",
        manifest,
        get_backbone("tiny"),
        tmp_path / "cache",
        settings,
        RunOptions(batch_size=12, workers=0),
        videos_root=tmp_path / "videos",
        progress=lambda p: seen.append((p.done, p.failed)),
    )
    assert result.path.parent == tmp_path / "cache" / "toy" and not result.failures
    assert seen[-1] == (5, 0) and len(seen) == 5
    cache = open_cache(result.path)
    assert (cache.dim, cache.frames, cache.patches) == (64, 8, 4)
    assert cache.fingerprint["backbone"] == "tiny" and cache.fingerprint["crop"] == 32
    # The recipe is parsed back from the fingerprint and rebuilds it, field for field (so the key too).
    recipe = cache.recipe
    assert (recipe.backbone, recipe.patches, recipe.train_views, recipe.normalize) == ("tiny", 2, 2, True)
    dataset_fields = {k: cache.fingerprint[k] for k in ("dataset", "manifest", "videos")}
    assert recipe.fingerprint(**dataset_fields) == cache.fingerprint
    train, test = cache.load_split("train"), cache.load_split("test")
    assert train.features.shape == (3, 2, 8, 4, 64) and test.features.shape == (2, 1, 8, 4, 64)
    assert train.class_names == ["train_0", "train_1"] and train.labels.tolist() == [0, 1, 0]
    assert test.video_ids == ["test_1/v03", "test_0/v04"] and test.labels.tolist() == [1, 0]
    for _split, features, first in (("train", train.features, 0), ("test", test.features, 3)):
        for j in range(len(features)):
            i = first + j
            for view in range(features.shape[1]):
                want = _expected(tmp_path / "videos" / manifest.path[i], 12 + 3 * i, manifest.video_id[i], view, 2)
                torch.testing.assert_close(features[j, view], want, rtol=1e-3, atol=1e-3)
    # The augmented view is another crop/flip of other frames: not a copy of the test view.
    assert not torch.equal(train.features[:, 0], train.features[:, 1])


class _FixedMap(torch.nn.Module):
    """A trunk that ignores its input and returns one feature map."""

    def __init__(self, fmap: torch.Tensor) -> None:
        super().__init__()
        self.fmap = fmap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fmap.expand(len(x), -1, -1, -1)


def test_patch_features_pool_is_a_row_major_max_over_overlapping_windows():
    fmap = torch.arange(2 * 7 * 7, dtype=torch.float32).view(1, 2, 7, 7)
    backbone = Backbone(_FixedMap(fmap), name="fixed", dim=2, layer="map", weights_id="", mean=(0,) * 3, std=(1,) * 3)
    frames = torch.zeros(1, 3, 7, 7, dtype=torch.uint8)
    out = patch_features(backbone, frames, normalize=False, patches=4)
    assert out.shape == (1, 16, 2) and out.dtype == torch.float16
    # Training pools the same map in float32 (gradients of float16 underflow): the same numbers.
    wide = patch_features(backbone, frames, normalize=False, patches=4, dtype=torch.float32)
    assert wide.dtype == torch.float32 and torch.equal(wide.half(), out)
    # 7 -> 4 windows overlap: rows [0,2) [1,4) [3,6) [5,7); the max is each window's bottom-right.
    rows = [1, 3, 5, 6]
    want = [7 * r + col for r in rows for col in rows]  # channel 0
    assert out[0, :, 0].tolist() == want
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int8", torch.device("cpu"))


def test_bad_videos_are_recorded_and_skipped_and_no_good_video_is_lost(tmp_path):
    videos = tmp_path / "videos"
    manifest = _videos(videos, n_train=3, n_test=1)
    (videos / "garbage.mp4").write_bytes(b"not a video" * 50)
    good = (videos / manifest.path[0]).read_bytes()
    (videos / "truncated.mp4").write_bytes(good[: len(good) // 3])
    bad = [
        ("garbage", "garbage.mp4", "ok"),
        ("truncated", "truncated.mp4", "ok"),
        ("flagged", "missing.mp4", "file not found"),
    ]
    extra = pd.DataFrame(
        [
            {"video_id": v, "class": "train_0", "split": "train", "path": p, "n_frames": -1, "status": s}
            for v, p, s in bad
        ]
    )
    manifest = pd.concat([manifest.iloc[:2], extra, manifest.iloc[2:]], ignore_index=True)
    result = extract(
        "toy",
        manifest,
        get_backbone("tiny"),
        tmp_path / "cache",
        ExtractSettings(views=1, spec=SPEC),
        RunOptions(batch_size=16, workers=1),
        videos_root=videos,
    )
    cache = open_cache(result.path)
    failed = dict(cache.failures("train"))
    assert set(failed) <= {"garbage", "truncated", "flagged"}
    assert {"garbage", "flagged"} <= set(failed)  # a truncated file may still give 8 frames
    assert "garbage.mp4" in failed["garbage"] and failed["flagged"] == "manifest: file not found"
    done = {
        v: d for split in ("train", "test") for v, d in zip(cache.video_ids(split), cache.done(split), strict=False)
    }
    good = [v for v in manifest.video_id if v not in {"garbage", "truncated", "flagged"}]
    assert len(good) == 4 and all(done[v] for v in good)
    assert sorted(v for v, _ in result.failures) == sorted(failed)
    # A rerun tries only the failed videos again.
    again = extract(
        "toy",
        manifest,
        get_backbone("tiny"),
        tmp_path / "cache",
        ExtractSettings(views=1, spec=SPEC),
        RunOptions(batch_size=16, workers=0),
        videos_root=videos,
    )
    assert again.path == result.path and again.progress.total == len(failed)
    assert again.progress.already_done == len(manifest) - len(failed)


def test_a_clip_of_7_frames_is_extracted_with_its_frames_repeated(tmp_path):
    """A person's own dataset may hold clips under L = 8 frames: they repeat frames as predict does (frame
    indices 0, 0, 1, ..., 6), in every view, instead of failing."""
    short = write_test_video(tmp_path / "videos" / "short.mp4", 7, size=(48, 48))
    manifest = pd.DataFrame(
        [{"video_id": "short", "class": "a", "split": "train", "path": "short.mp4", "n_frames": -1, "status": "ok"}]
    )
    result = extract(
        "toy",
        manifest,
        get_backbone("tiny"),
        tmp_path / "cache",
        ExtractSettings(views=2, spec=SPEC),
        RunOptions(batch_size=16, workers=0),
        videos_root=tmp_path / "videos",
    )
    cache = open_cache(result.path)
    assert result.failures == [] and list(cache.done("train")) == [True]
    whole = ViewSpec(short_side=48, crop=48)  # the view is the whole frame, so each frame's index reads back
    views = decode_job(VideoJob("train", 0, "short", str(short), -1, 2, 0, whole, repeat_short=True))
    assert [read_index(frame) for frame in views[:8]] == [0, 0, 1, 2, 3, 4, 5, 6]
    with pytest.raises(ShortVideo):  # predict's own jobs still learn the count from the authors' refusal
        decode_job(VideoJob("query", 0, "short", str(short), -1, 1, 0, whole))


def test_other_settings_go_to_another_cache_and_a_reordered_manifest_to_the_same(tmp_path):
    manifest = _videos(tmp_path / "videos", n_train=2, n_test=1)
    run = dict(
        dataset="toy",
        cache_root=tmp_path / "cache",
        videos_root=tmp_path / "videos",
        options=RunOptions(batch_size=8, workers=0),
    )
    a = extract(manifest=manifest, backbone=get_backbone("tiny"), settings=ExtractSettings(views=1, spec=SPEC), **run)
    b = extract(
        manifest=manifest,
        backbone=get_backbone("tiny"),
        settings=ExtractSettings(views=1, spec=SPEC, normalize=False),
        **run,
    )
    assert a.path != b.path
    assert open_cache(b.path).fingerprint["normalize"] == "none: [0, 1]"
    assert not np.array_equal(
        open_cache(a.path).features_array("test")[:], open_cache(b.path).features_array("test")[:]
    )
    # The same rows in another order: the same cache, nothing left to do, video order kept.
    again = extract(
        manifest=manifest.iloc[::-1], backbone=get_backbone("tiny"), settings=ExtractSettings(views=1, spec=SPEC), **run
    )
    assert again.path == a.path and (again.progress.total, again.progress.already_done) == (0, 3)
    assert open_cache(a.path).video_ids("train") == ["train_0/v00", "train_1/v01"]
    with pytest.raises(ValueError, match="lists train video 'train_0/v00' more than once"):
        extract(
            manifest=pd.concat([manifest, manifest.iloc[:1]]),
            backbone=get_backbone("tiny"),
            settings=ExtractSettings(views=1, spec=SPEC),
            **run,
        )


def _by_video(cache) -> dict[str, np.ndarray]:
    return {
        v: x.numpy()
        for s in cache.splits
        for v, x in zip(cache.load_split(s).video_ids, cache.load_split(s).features, strict=True)
    }


def test_an_added_clip_extracts_only_itself_and_leaves_the_others_bit_identical(tmp_path):
    """The cache is keyed by the recipe: a manifest with one more clip extracts that clip alone into the
    same cache, a removed clip or a reordered manifest extracts nothing, and a rewritten file is
    extracted again. Every video's features equal those of one extraction of the final manifest."""
    videos = tmp_path / "videos"
    manifest = _videos(videos, n_train=4, n_test=2)
    run = dict(dataset="toy", backbone=get_backbone("tiny"), settings=ExtractSettings(views=2, spec=SPEC))
    run |= dict(options=RunOptions(batch_size=8, workers=0), videos_root=videos)
    first = extract(manifest=manifest.drop(index=2), cache_root=tmp_path / "cache", **run)
    before = _by_video(open_cache(first.path))
    added = extract(manifest=manifest, cache_root=tmp_path / "cache", **run)
    assert added.path == first.path and (added.progress.total, added.progress.done) == (1, 1)
    assert added.progress.already_done == 5 and added.failures == []
    after = _by_video(open_cache(added.path))
    assert set(after) == set(before) | {"train_0/v02"}
    assert all(np.array_equal(after[v], before[v]) for v in before)  # bit for bit
    fresh = extract(manifest=manifest, cache_root=tmp_path / "fresh", **run)
    assert all(np.array_equal(x, _by_video(open_cache(fresh.path))[v]) for v, x in after.items())
    removed = extract(manifest=manifest.drop(index=0), cache_root=tmp_path / "cache", **run)
    assert removed.progress.total == 0 and len(_by_video(open_cache(removed.path))) == 5
    write_test_video(videos / manifest.path[2], 40)  # the file changes: its features are made again
    changed = extract(manifest=manifest, cache_root=tmp_path / "cache", **run)
    assert (changed.progress.total, changed.progress.done) == (1, 1)
    assert not np.array_equal(_by_video(open_cache(changed.path))["train_0/v02"], after["train_0/v02"])
    assert sorted(p.name for p in (tmp_path / "cache" / "toy").iterdir() if not p.name.startswith(".")) == [
        first.path.name
    ]


# ---------------------------------------------------------------------------------------------
# The CLI in real processes: kill -9 and resume, torchrun with 2 gloo ranks


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """12 videos (10 train with 2 views, 2 test) and a manifest CSV, plus an uninterrupted CLI run's cache."""
    root = tmp_path_factory.mktemp("extract")
    manifest = _videos(root / "videos", n_train=10, n_test=2)
    manifest.to_csv(root / "manifest.csv", index=False)
    reference = _cli_run(root, root / "reference", "--workers", "0")
    return root, reference


def _cli_args(root: Path, cache_root: Path, *extra: str) -> list[str]:
    return [
        "extract",
        "toy",
        "--videos",
        str(root / "videos"),
        "--manifest",
        str(root / "manifest.csv"),
        "--backbone",
        "tiny",
        "--views",
        "2",
        "--short-side",
        "40",
        "--crop",
        "32",
        "--batch-size",
        "8",
        "--cache-root",
        str(cache_root),
        *extra,
    ]


def _entry(root: Path) -> Path:
    script = root / "strm_main.py"
    # A script entry point, as a user would write one (workers start without its __main__ either way).
    script.write_text("from stages.app import main\n\nif __name__ == '__main__':\n    main()\n")
    return script


def _env() -> dict[str, str]:
    # PyAV decodes these tiny files as well as torchcodec and saves each process torchcodec's
    # import (seconds); one torch thread per process keeps the shared CPU usable.
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "STRM_DECODER": "pyav"}


def _cli_run(root: Path, cache_root: Path, *extra: str) -> Path:
    done = subprocess.run(
        [sys.executable, str(_entry(root)), *_cli_args(root, cache_root, *extra)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip().splitlines()[-1])


def _assert_same_cache(a: Path, b: Path) -> None:
    ca, cb = open_cache(a), open_cache(b)
    assert ca.fingerprint == cb.fingerprint
    for split in ("train", "test"):
        assert ca.done(split).all() and cb.done(split).all()
        np.testing.assert_array_equal(ca.features_array(split)[:], cb.features_array(split)[:])
        assert ca.video_ids(split) == cb.video_ids(split)


def test_kill_9_mid_run_then_rerun_gives_bit_identical_arrays(dataset, tmp_path):
    root, reference = dataset
    cache_root = tmp_path / "cache"
    path = cache_root / "toy" / reference.name  # same settings, same key
    process = subprocess.Popen(
        [sys.executable, str(_entry(root)), *_cli_args(root, cache_root, "--workers", "1")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(),
        cwd=REPO,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (path / "zarr.json").exists() and open_cache(path).done("train").sum() >= 2:
                break
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the run and its decoding workers, all at once
        process.wait()
    cache = open_cache(path)
    done_at_kill = int(cache.done("train").sum() + cache.done("test").sum())
    assert 2 <= done_at_kill < 12, "the kill must land mid-run"
    resumed = _cli_run(root, cache_root, "--workers", "1")
    assert resumed == path
    _assert_same_cache(reference, resumed)


def test_kills_at_random_moments_then_a_rerun_give_bit_identical_arrays(dataset, tmp_path):
    """SIGKILL at a seeded random moment (start-up, mid-run, near the end), then the same command:
    each trial's cache equals the uninterrupted one. `make faults` lands 20 kills."""
    root, reference = dataset

    def command(trial: int) -> list[str]:
        return [sys.executable, str(_entry(root)), *_cli_args(root, tmp_path / f"cache{trial}", "--workers", "1")]

    def check(trial: int) -> None:
        _assert_same_cache(reference, tmp_path / f"cache{trial}" / "toy" / reference.name)

    duration = timed_run(command(-1), env=_env(), cwd=REPO)
    campaign = kill_at_random(
        command, check, env=_env(), cwd=REPO, kills=kills_from_env(2), seed=seed_from_env(1), duration_s=duration
    )
    assert campaign.final_returncode == 0, campaign.summary() + campaign.final_stderr
    assert campaign.landed == kills_from_env(2), campaign.summary()
    assert campaign.matched == len(campaign.moments_s), campaign.summary()  # every trial, landed or not
    print(f"extract faults: {campaign.summary()}, {duration:.1f} s uninterrupted")


def test_two_gloo_ranks_under_torchrun_equal_the_single_process_cache(dataset, tmp_path):
    root, reference = dataset
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(_entry(root)),
        *_cli_args(root, tmp_path / "cache", "--workers", "0", "--device", "cpu"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    path = tmp_path / "cache" / "toy" / reference.name
    assert str(path) in done.stdout
    _assert_same_cache(reference, path)


def test_cli_reports_failures_and_clear_errors(dataset, tmp_path):
    root, _ = dataset
    manifest = pd.read_csv(root / "manifest.csv")
    (tmp_path / "broken.mp4").write_bytes(b"\0" * 100)
    manifest.loc[len(manifest)] = {
        "video_id": "broken",
        "class": "test_0",
        "split": "test",
        "path": str(tmp_path / "broken.mp4"),
        "n_frames": -1,
        "status": "ok",
    }
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    runner = CliRunner()

    def args(backbone: str) -> list[str]:
        return [
            "extract",
            "toy",
            "--videos",
            str(root / "videos"),
            "--manifest",
            str(tmp_path / "manifest.csv"),
            "--backbone",
            backbone,
            "--views",
            "1",
            "--short-side",
            "40",
            "--crop",
            "32",
            "--workers",
            "0",
            "--cache-root",
            str(tmp_path / "cache"),
        ]

    result = runner.invoke(app, args("tiny"))
    assert result.exit_code == 0, result.output
    assert "failed broken:" in result.output and "test: 2/3 videos done, 1 failed" in result.output
    assert str(tmp_path / "cache" / "toy") in result.output
    assert "this run: 12 videos extracted, 1 failed" in result.output
    result = runner.invoke(app, args("no_such_net"))
    assert result.exit_code == 1 and "unknown backbone 'no_such_net'" in result.output
    manifest.iloc[-1:].to_csv(tmp_path / "manifest.csv", index=False)  # only the broken video
    result = runner.invoke(app, args("tiny"))
    assert result.exit_code == 1 and "no video could be extracted" in result.output


class _OverflowOnCall(torch.nn.Module):
    """The tiny trunk, whose output on its `bad`-th call is beyond float16's range (1e6)."""

    def __init__(self, trunk: torch.nn.Module, bad: int) -> None:
        super().__init__()
        self.trunk, self.bad, self.calls = trunk, bad, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.trunk(x)
        return out * 1e6 if self.calls == self.bad else out


def test_a_backbone_that_overflows_on_one_video_fails_that_video_only(tmp_path):
    manifest = _videos(tmp_path / "videos", n_train=3, n_test=1)
    tiny = get_backbone("tiny")
    backbone = Backbone(
        _OverflowOnCall(tiny.trunk, bad=2),
        name=tiny.name,
        dim=tiny.dim,
        layer=tiny.layer,
        weights_id=tiny.weights_id,
        mean=tiny.mean,
        std=tiny.std,
    )
    # One view of 8 frames a video and batches of 8 frames: each backbone call is one video's.
    result = extract(
        "toy",
        manifest,
        backbone,
        tmp_path / "cache",
        ExtractSettings(views=1, spec=SPEC),
        RunOptions(batch_size=8, workers=0),
        videos_root=tmp_path / "videos",
    )
    assert len(result.failures) == 1 and "not finite" in result.failures[0][1]
    cache = open_cache(result.path)
    done = {v: d for s in ("train", "test") for v, d in zip(cache.video_ids(s), cache.done(s), strict=True)}
    assert sum(done.values()) == 3 and not done[result.failures[0][0]]
    for s in ("train", "test"):
        assert np.isfinite(cache.load_split(s).features.numpy()).all()


def _stalling_decode(job):
    """decode_job, except that the video named `stalled` never returns (a read on a stalled mount)."""
    if job.video_id.endswith("stalled"):
        time.sleep(3600)
    return decode_job(job)


def test_a_stalled_decoder_fails_its_video_after_the_time_limit(tmp_path, monkeypatch):
    """A video whose decoding never returns fails after the decode time limit (its worker is stopped
    and replaced); the other videos are extracted."""
    import pipeline.features.extract as extract_module

    monkeypatch.setattr(extract_module, "decode_job", _stalling_decode)  # pickled by name: workers import it
    manifest = _videos(tmp_path / "videos", n_train=3, n_test=1)
    manifest.loc[1, "video_id"] = "train_1/stalled"
    start = time.monotonic()
    result = extract(
        "toy",
        manifest,
        get_backbone("tiny"),
        tmp_path / "cache",
        ExtractSettings(views=1, spec=SPEC),
        RunOptions(batch_size=8, workers=1, decode_time_limit_s=20),
        videos_root=tmp_path / "videos",
    )
    assert time.monotonic() - start < 240
    assert result.failures == [("train_1/stalled", "timed out after 20 s; worker process stopped")]
    assert result.progress.done == 3


def test_a_second_extraction_into_a_cache_in_use_is_refused_naming_the_first(tmp_path):
    from pipeline.features.cache import CacheWriter
    from pipeline.features.readers import CacheBusy

    manifest = _videos(tmp_path / "videos", n_train=2, n_test=1)
    run = {"videos_root": tmp_path / "videos"}
    settings, options = ExtractSettings(views=1, spec=SPEC), RunOptions(batch_size=8, workers=0)
    path = extract("toy", manifest, get_backbone("tiny"), tmp_path / "cache", settings, options, **run).path
    holder = CacheWriter(path)
    holder.hold()  # as a first extraction still running would
    try:
        with pytest.raises(CacheBusy, match=rf"another extraction is writing this cache \(pid {os.getpid()}"):
            extract("toy", manifest, get_backbone("tiny"), tmp_path / "cache", settings, options, **run)
    finally:
        holder.release()
    extract("toy", manifest, get_backbone("tiny"), tmp_path / "cache", settings, options, **run)  # free again
