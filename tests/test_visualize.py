"""Activation maps, tuple matches and `strm visualize`: the numbers behind the pictures, and pictures that are not blank."""

from __future__ import annotations

import matplotlib.image as mpimg
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner
from video_factory import write_test_video

from pipeline.data.video import ViewSpec, load_view
from pipeline.features.cache import open_cache
from pipeline.features.copies import write_random_cache
from pipeline.features.recipe import FeatureRecipe
from pipeline.heads import build_heads, save_heads
from pipeline.studies.visualize import (
    FrameSource,
    activation_maps,
    render,
    tuple_matches,
)
from stages.app import app

DIM = 32
TINY = {"trm_dim": 16, "psi_dim": 16, "qc_dim": 16}


@pytest.fixture(scope="module")
def heads():
    torch.manual_seed(0)
    h = build_heads("strm", dim=DIM, **TINY)
    with torch.no_grad():
        h.ple.gamma.fill_(0.5)
    h.set_feature_stats(torch.full((DIM,), 0.1), torch.full((DIM,), 2.0))
    return h.eval()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("vis") / "cache"
    write_random_cache(path, splits={"train": (5, 9, 1), "test": (5, 6, 1)}, dim=DIM, signal=0.8)
    return open_cache(path)


def _non_trivial_png(path, min_bytes=10_000):
    assert path.is_file() and path.stat().st_size > min_bytes
    image = mpimg.imread(path)
    assert image.std() > 0.02  # not a blank canvas


def test_activation_maps_are_patch_norms_before_and_after_ple(heads):
    x = torch.randn(8, 16, DIM)
    maps = activation_maps(heads, x)
    assert maps.before.shape == maps.after.shape == maps.change.shape == (8, 4, 4)
    standardised = (x - 0.1) / 2.0
    torch.testing.assert_close(torch.from_numpy(maps.before), standardised.norm(dim=-1).reshape(8, 4, 4))
    with torch.no_grad():
        after = heads.encode(x[None], intermediates=True).ple_patches[0]
    torch.testing.assert_close(torch.from_numpy(maps.after), after.norm(dim=-1).reshape(8, 4, 4))
    torch.testing.assert_close(torch.from_numpy(maps.change), (after - standardised).norm(dim=-1).reshape(8, 4, 4))


def test_activation_maps_without_ple():
    trm = build_heads("trm", dim=DIM, **TINY)
    maps = activation_maps(trm, torch.randn(8, 16, DIM))
    assert maps.after is None and maps.change is None and maps.before.shape == (8, 4, 4)


def test_tuple_matches_are_the_strongest_attention_weights_of_the_right_class(heads):
    torch.manual_seed(1)
    support = torch.randn(10, 8, 16, DIM)
    labels = torch.tensor([1, 0, 2, 4, 3, 0, 1, 2, 3, 4])  # unsorted on purpose
    query = torch.randn(8, 16, DIM)
    found = tuple_matches(heads, support, labels, query, label=2, query_tuples=3, top=4)
    with torch.no_grad():
        weights = heads.trm_attention(heads.encode(support), labels, heads.encode(query[None]))[0, 2]  # [T, shot, T]
    tuples = [tuple(t) for t in heads.trm[0].tuples.tolist()]
    peaks = weights.flatten(1).max(dim=1).values
    assert len(found) == 3
    assert [tuples.index(f.frames) for f in found] == peaks.argsort(descending=True)[:3].tolist()
    for row in found:
        qt = tuples.index(row.frames)
        values = [m.weight for m in row.matches]
        assert values == sorted(values, reverse=True) and len(values) == 4
        assert values[0] == pytest.approx(float(peaks[qt]))
        for m in row.matches:
            assert int(labels[m.support_index]) == 2  # a support video of the asked class
            assert m.weight == pytest.approx(float(weights[qt, m.shot, tuples.index(m.frames)]))


def test_render_writes_non_trivial_pngs(heads, cache, tmp_path):
    written = render(heads, cache.load_split("test"), tmp_path, count=2)
    assert len([k for k in written if k.startswith("activation:")]) == 2
    assert len([k for k in written if k.startswith("tuples:")]) == 2
    for path in written.values():
        _non_trivial_png(path)


def test_frame_source_gives_view_zero_with_the_cache_geometry(tmp_path):
    video = write_test_video(tmp_path / "a" / "v1.mp4", 20, size=(64, 48))
    manifest = pd.DataFrame(
        {"video_id": ["a/v1", "a/gone"], "path": [str(video), str(tmp_path / "gone.mp4")], "n_frames": [-1, 20]}
    )
    recipe = FeatureRecipe(
        backbone="tiny",
        layer="conv3",
        weights="x",
        short_side=48,
        crop=40,
        flip=True,
        mean=None,
        std=None,
        frames=8,
        patches=4,
        train_views=1,
        view_seed=3,
        sampling_rule="r",
        precision="fp32",
    )
    source = FrameSource(manifest, recipe)
    frames = source("a/v1")
    assert frames.shape == (8, 3, 40, 40)
    assert torch.equal(frames, load_view(video, 20, "a/v1", 0, 3, ViewSpec(48, 40)))
    assert source("a/gone") is None and "gone.mp4" in source.errors["a/gone"]
    assert source("nope") is None and source.errors["nope"] == "not in the manifest"


def test_cli_draws_from_a_checkpoint_and_a_manifest(heads, cache, tmp_path):
    checkpoint = tmp_path / "heads.pt"
    save_heads(checkpoint, heads)
    test_ids = cache.video_ids("test")
    video = write_test_video(tmp_path / "videos" / "x.mp4", 16, size=(64, 64))
    manifest = tmp_path / "manifest.csv"
    n = len(test_ids)
    pd.DataFrame(
        {
            "video_id": test_ids,
            "class": [i.split("/")[0] for i in test_ids],
            "split": ["test"] * n,
            "path": [str(video)] * n,
            "n_frames": [16] * n,
            "status": ["ok"] * n,
        }
    ).to_csv(manifest, index=False)
    out = tmp_path / "figures"
    result = CliRunner().invoke(
        app,
        [
            "visualize",
            "--cache",
            str(cache.path),
            "--checkpoint",
            str(checkpoint),
            "--videos",
            str(manifest),
            "--count",
            "1",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "without frames" not in result.output  # every video was found and decoded
    assert sorted(p.name for p in out.iterdir()) == ["activation_0.png", "tuples_0.png"]
    for path in out.iterdir():
        _non_trivial_png(path)


def test_cli_errors_are_one_line(cache, tmp_path):
    result = CliRunner().invoke(
        app, ["visualize", "--cache", str(cache.path), "--checkpoint", str(tmp_path / "none.pt")]
    )
    assert result.exit_code == 2 and "none.pt: no such file" in result.output
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    result = CliRunner().invoke(app, ["visualize", "--cache", str(cache.path), "--checkpoint", str(bad)])
    assert result.exit_code == 1 and "not a readable checkpoint" in result.output
