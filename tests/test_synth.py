"""The synthetic benchmark: classes and split, determinism, real decodable MP4s, temporal order."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from pipeline.data import synth
from pipeline.data.manifests import read_class_splits
from stages import synth as synth_stage

REPO = Path(__file__).resolve().parents[1]
FEW = ("grow_then_exit_left", "exit_left_then_grow", "cover_then_recolour", "appear_then_appear")


def decode(path: Path) -> np.ndarray:
    """All frames of a video as uint8 [n, H, W, 3], through PyAV."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def as_yuv420(frames: np.ndarray) -> np.ndarray:
    """Frames through the RGB -> yuv420p -> RGB conversion alone (chroma subsampling, no codec)."""
    convert = [av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p") for f in frames]
    return np.stack([f.to_ndarray(format="rgb24") for f in convert])


def patch_means(frames: np.ndarray, grid: int = 4) -> np.ndarray:
    """Frames averaged over a grid x grid layout of patches, like pooled backbone features."""
    n, h, w, c = frames.shape
    return frames.reshape(n, grid, h // grid, grid, w // grid, c).astype(np.float32).mean(axis=(2, 4))


def test_classes_are_all_ordered_pairs_with_readable_names():
    assert len(synth.PRIMITIVES) == 10
    assert len(synth.CLASSES) == len(set(synth.CLASSES)) == 100
    assert {synth.parse_class(c) for c in synth.CLASSES} == {(a, b) for a in synth.PRIMITIVES for b in synth.PRIMITIVES}
    assert synth.parse_class("grow_then_exit_left") == ("grow", "exit_left")
    for bad in ("grow", "grow_then_fly", "jump_then_grow"):
        with pytest.raises(ValueError, match="not a synthetic class"):
            synth.parse_class(bad)


def test_split_is_64_12_24_fixed_and_recorded_in_the_manifest():
    split = synth.class_split()
    assert Counter(split.values()) == {"train": 64, "val": 12, "test": 24}
    assert synth.class_split() == split
    assert synth.class_split(seed=1) != split
    with open(REPO / "data_manifests" / "synthetic.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["class", "split"]
    assert {r["class"]: r["split"] for r in rows} == split
    assert len(rows) == 100


def test_render_is_a_pure_function_of_seed_class_and_index():
    a = synth.render_video("grow_then_exit_left", 3, seed=7)
    assert np.array_equal(a, synth.render_video("grow_then_exit_left", 3, seed=7))
    assert not np.array_equal(a[:16], synth.render_video("grow_then_exit_left", 3, seed=8)[:16])
    assert not np.array_equal(a[:16], synth.render_video("grow_then_exit_left", 4, seed=7)[:16])


def test_frame_count_boundary_and_size_ranges():
    spec = synth.SynthSpec()
    lengths = []
    for i in range(40):
        clip = synth.draw_clip(np.random.default_rng(i), spec)
        assert spec.min_frames <= clip.n_frames <= spec.max_frames
        assert abs(clip.boundary - clip.n_frames // 2) <= 1
        assert 0 <= clip.first[0] <= 0.15 and 0.85 <= clip.first[1] <= 1
        lengths.append(clip.n_frames)
    assert len(set(lengths)) > 5  # lengths vary, so the frame-sampling rule is exercised
    frames = synth.render_video("cover_then_recolour", 0)
    assert frames.dtype == np.uint8 and frames.shape[1:] == (spec.size, spec.size, 3)
    assert spec.min_frames <= len(frames) <= spec.max_frames
    for i in range(10):
        scene = synth.draw_scene(np.random.default_rng(i), spec)
        assert spec.object_min <= scene.side <= spec.object_max
        assert all(abs(c - spec.size / 2) <= spec.centre_jitter for c in scene.centre)


def test_reversed_classes_share_frames_in_the_other_order():
    scene = synth.draw_scene(np.random.default_rng(0))
    clip = synth.Clip(n_frames=20, boundary=10, first=(0.05, 0.95), second=(0.05, 0.95))
    ab = synth.render_clip(scene, "grow", "exit_left", clip)
    ba = synth.render_clip(scene, "exit_left", "grow", clip)
    assert np.array_equal(ab[:10], ba[10:]) and np.array_equal(ab[10:], ba[:10])
    assert np.abs(ab.astype(int) - ba.astype(int)).mean() > 5  # the same frames, in another order
    # Across the class API the two classes are different videos too.
    assert not np.array_equal(
        synth.render_video("grow_then_exit_left", 0)[:16], synth.render_video("exit_left_then_grow", 0)[:16]
    )


@pytest.mark.parametrize("primitive", synth.PRIMITIVES)
def test_every_primitive_changes_what_the_4x4_patches_contain(primitive):
    """Translations inside the frame vanish under patch pooling; each primitive must survive it."""
    changes = []
    for i in range(3):
        scene = synth.draw_scene(np.random.default_rng(i))
        start, end = synth.render_segment(scene, primitive, [0.1, 0.9])[[0, 1]]
        changes.append(np.abs(patch_means(start[None]) - patch_means(end[None])).max())
    assert min(changes) > 15, changes  # grey levels, 0..255


def test_generate_writes_decodable_deterministic_resumable_videos(tmp_path):
    done = []
    result = synth.generate(tmp_path / "a", videos_per_class=2, seed=3, classes=FEW, progress=done.append)
    assert (result.written, result.skipped, result.failed) == (8, 0, ())
    assert sum(done) == 8
    paths = sorted((tmp_path / "a").glob("*/*.mp4"))
    assert [p.relative_to(tmp_path / "a").as_posix() for p in paths][:2] == [
        "appear_then_appear/appear_then_appear_000.mp4",
        "appear_then_appear/appear_then_appear_001.mp4",
    ]
    assert len(paths) == 8 and not list((tmp_path / "a").glob("*/*.part"))
    assert json.loads((tmp_path / "a" / synth.INFO_FILE).read_text())["seed"] == 3

    synth.generate(tmp_path / "b", videos_per_class=2, seed=3, classes=FEW)
    for path in paths:
        decoded = decode(path)
        rendered = synth.render_video(path.parent.name, int(path.stem[-3:]), seed=3)
        assert decoded.shape == rendered.shape  # every frame comes back, none dropped or duplicated
        assert np.abs(decoded.astype(int) - as_yuv420(rendered).astype(int)).mean() < 3  # H.264's own loss is small
        assert np.array_equal(decoded, decode(tmp_path / "b" / path.relative_to(tmp_path / "a")))

    paths[0].unlink()
    again = synth.generate(tmp_path / "a", videos_per_class=2, seed=3, classes=FEW)
    assert (again.written, again.skipped) == (1, 7)
    assert np.array_equal(decode(paths[0]), decode(tmp_path / "b" / paths[0].relative_to(tmp_path / "a")))
    with pytest.raises(synth.SynthError, match="seed: found 3, asked 4"):
        synth.generate(tmp_path / "a", videos_per_class=2, seed=4, classes=FEW)
    with pytest.raises(ValueError, match="not a synthetic class"):
        synth.generate(tmp_path / "c", classes=["fly_then_grow"])


def _app() -> typer.Typer:
    app = typer.Typer()
    synth_stage.register(app)
    app.command("other")(lambda: None)  # with two commands Typer keeps `synth` as a sub-command
    return app


def test_cli_writes_every_class_with_workers(tmp_path):
    result = CliRunner().invoke(_app(), ["synth", "--out", str(tmp_path), "--videos-per-class", "1", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "100 videos written" in result.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted(synth.CLASSES)
    assert len(decode(synth.video_path(tmp_path, "shrink_then_cover", 0))) >= 16


def test_cli_refuses_a_folder_of_other_settings(tmp_path):
    (tmp_path / synth.INFO_FILE).write_text(json.dumps({"generator": "0", "seed": 0}))
    result = CliRunner().invoke(_app(), ["synth", "--out", str(tmp_path), "--videos-per-class", "1"])
    assert result.exit_code == 2
    assert "synth.json" in result.output and "generator: found 0" in result.output
    assert not list(tmp_path.glob("*/*.mp4"))


def test_a_smaller_benchmark_keeps_the_split_shares_and_the_full_benchmark_videos(tmp_path):
    """`strm synth --classes N`: the first classes of each split in about 64/12/24 shares, each split a
    5-way task's worth; all 100 are the benchmark itself; its split goes to OUT/classes.csv."""
    assert synth.class_subset(100, 5) == synth.class_split()
    small = synth.class_subset(20, 5)
    assert Counter(small.values()) == {"train": 10, "val": 5, "test": 5}
    assert all(synth.class_split()[c] == s for c, s in small.items())
    assert set(synth.class_subset(15, 5)) <= set(small)  # a smaller one is a part of a larger one
    with pytest.raises(ValueError, match="expected 15 to 100"):
        synth.class_subset(14, 5)
    app = typer.Typer()
    app.callback()(lambda: None)
    synth_stage.register(app)
    out = tmp_path / "small"
    result = CliRunner().invoke(app, ["synth", "--out", str(out), "--classes", "15", "--videos-per-class", "1"])
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("*/*.mp4"))) == 15 and "--name synthetic15" in result.output
    assert read_class_splits(out / "classes.csv") == synth.class_subset(15, 5)
    assert CliRunner().invoke(app, ["synth", "--out", str(out), "--classes", "7"]).exit_code == 2
