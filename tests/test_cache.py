"""The feature cache: schema, resumable writes, fingerprint checks, a store that grows, reading and export."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import pipeline.features.readers as readers_module
from pipeline.features.cache import CacheWriter, SplitLayout, open_cache
from pipeline.features.copies import write_random_cache
from pipeline.features.readers import CacheError, available_ram, choose_loading
from pipeline.features.recipe import store_key
from stages.app import app

FP = {"dataset": "toy", "backbone": "tiny", "views": 2}


def _layouts() -> dict[str, SplitLayout]:
    return {
        "train": SplitLayout(["a/1", "a/2", "b/1"], [0, 0, 1], ["a", "b"], views=2),
        "test": SplitLayout(["c/1", "d/1"], [0, 1], ["c", "d"], views=1),
    }


def _create(path):
    return CacheWriter.create(path, FP, _layouts(), frames=8, patches=16, dim=4)


def test_write_then_read_keeps_only_done_videos(tmp_path):
    writer = _create(tmp_path / "c")
    feats = np.arange(2 * 8 * 16 * 4, dtype=np.float32).reshape(2, 8, 16, 4) / 1000
    writer.write("train", 2, feats)
    writer.fail("train", 1, "corrupt file\nsecond line")
    cache = open_cache(tmp_path / "c")
    split = cache.load_split("train")
    assert split.video_ids == ["b/1"]
    assert split.labels.tolist() == [1]
    assert split.features.dtype.is_floating_point and split.features.shape == (1, 2, 8, 16, 4)
    np.testing.assert_allclose(split.features[0].float().numpy(), feats, rtol=1e-3)
    assert cache.failures("train") == [("a/2", "corrupt file second line")]
    assert list(CacheWriter(tmp_path / "c").pending("train")) == [0, 1]
    summary = cache.summary()
    assert summary["splits"]["train"] == {**summary["splits"]["train"], "done": 1, "failed": 1, "pending": 1}


def test_reopening_with_other_settings_names_the_difference(tmp_path):
    _create(tmp_path / "c")
    assert _create(tmp_path / "c").key == store_key(FP)  # same settings reopen
    with pytest.raises(CacheError, match="backbone: 'tiny' in the cache, 'resnet50' asked"):
        CacheWriter.create(tmp_path / "c", {**FP, "backbone": "resnet50"}, _layouts(), frames=8, patches=16, dim=4)


def test_write_rejects_wrong_shape_and_open_rejects_non_cache(tmp_path):
    writer = _create(tmp_path / "c")
    with pytest.raises(ValueError, match="cache expects"):
        writer.write("test", 0, np.zeros((2, 8, 16, 4)))
    with pytest.raises(CacheError, match="not a feature cache"):
        open_cache((tmp_path / "empty").mkdir() or tmp_path / "empty")  # no zarr.json, no cache inside
    with pytest.raises(CacheError, match="no split 'val'"):
        open_cache(tmp_path / "c").load_split("val")


def test_random_cache_is_class_structured_and_views_can_be_limited(tmp_path):
    path = write_random_cache(tmp_path / "r", splits={"train": (3, 4, 2), "test": (2, 3, 1)}, dim=8, signal=3.0)
    cache = open_cache(path)
    train = cache.load_split("train", views=1)
    assert train.features.shape == (12, 1, 8, 16, 8)
    assert cache.split_nbytes("train") == 12 * 2 * 8 * 16 * 8 * 2
    flat = train.features.float().flatten(1)
    means = [flat[train.labels == c].mean(0) for c in range(3)]
    nearest = [int(np.argmin([((x - m) ** 2).sum() for m in means])) for x in flat]
    assert nearest == train.labels.tolist()

    for loading in ("ram", "stream"):  # every reader gathers the same rows: view views[k] of video videos[k]
        reader = cache.split("train", loading=loading)
        videos, views = np.array([11, 0, 5, 5]), np.array([1, 0, 1, 0])
        expected = torch.stack([reader.block(np.array([v]))[0, w] for v, w in zip(videos, views, strict=False)])
        assert torch.equal(reader.read(videos, views), expected), loading
        assert reader.nbytes == cache.split_nbytes("train")
        assert cache.split("train", views=1, loading=loading).views == 1  # the views a sampler may draw
        assert cache.split("train", views=5, loading=loading).views == 2  # at most the cached ones
    assert cache.split_nbytes("train", views=5) == cache.split_nbytes("train")


GB = 10**9


def test_auto_loading_prefers_the_gpu_then_ram_then_disk(monkeypatch):
    """On CUDA a split goes to the GPU when it takes at most half its free memory (and fits the host's on
    the way), else to RAM when it takes less than half the available memory, else it is streamed; on CPU
    the GPU is never chosen."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (130 * GB, 140 * GB))
    monkeypatch.setattr(readers_module, "available_ram", lambda: 64 * GB)
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert choose_loading(5 * GB, "auto", gpu) == "device"
    assert choose_loading(55 * GB, "auto", gpu) == "stream"  # fits the GPU, not 0.8 of the host on its way
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * GB, 80 * GB))
    assert choose_loading(6 * GB, "auto", gpu) == "ram"  # FeatureCache.split makes it "pinned" on CUDA
    assert choose_loading(32 * GB, "auto", gpu) == "stream"
    assert choose_loading(5 * GB, "auto", cpu) == "ram"
    assert choose_loading(40 * GB, "auto", cpu) == "stream"
    assert choose_loading(1, "stream", gpu) == "stream"
    with pytest.raises(CacheError, match="needs --device cuda"):
        choose_loading(1, "device", cpu)


def test_available_ram_counts_reclaimable_page_cache(tmp_path):
    """MemAvailable (free + reclaimable cache), not MemFree: after an extraction fills the page cache,
    MemFree alone would stream splits that fit in RAM."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         2000000 kB\nMemAvailable:   20000000 kB\n")
    assert available_ram(str(meminfo)) == 20000000 * 1024
    assert available_ram() > 0  # this machine's


def test_cli_info_and_hdf5_export(tmp_path):
    path = write_random_cache(tmp_path / "r", splits={"train": (2, 2, 1), "val": (2, 2, 1)}, dim=4)
    runner = CliRunner()
    result = runner.invoke(app, ["cache", "info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["splits"]["val"]["done"] == 4
    out = tmp_path / "x.h5"
    result = runner.invoke(app, ["cache", "export", str(path), str(out), "--format", "hdf5"])
    assert result.exit_code == 0, result.output
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["train/features"][:], open_cache(path).load_split("train").features.numpy())
        assert [v.decode() for v in f["val/video_ids"][:]] == open_cache(path).video_ids("val")
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["cache", "info", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "not a feature cache" in result.output


def _growing(tmp_path, ids_and_files: list[tuple[str, str | None]], name: str = "m"):
    """Select one train split of these (video id, file) videos; returns the writer."""
    ids = [v for v, _ in ids_and_files]
    layout = SplitLayout(ids, [0] * len(ids), ["a"], views=2, files=[f for _, f in ids_and_files])
    fp = {**FP, "manifest": name, "videos": len(ids)}
    return CacheWriter.create(tmp_path / "c", fp, {"train": layout}, frames=8, patches=16, dim=4)


def test_a_selection_picks_stored_videos_by_id_and_file_so_the_store_grows(tmp_path):
    """A new manifest keeps the slots (and features) of the videos it shares with the old one, adds
    slots for new ones, and a file with another identity is another video; the old manifest's
    selection is still there and the key is the recipe's."""
    first = _growing(tmp_path, [("a/1", "10:1"), ("a/2", "20:1")])
    feats = np.random.default_rng(0).standard_normal((2, 2, 8, 16, 4)).astype(np.float16)
    for i in range(2):
        first.write("train", i, feats[i])
    second = _growing(tmp_path, [("a/0", "5:1"), ("a/1", "10:1"), ("a/2", "20:2")], name="m2")
    assert second.key == first.key == store_key(FP)
    assert second.slots("train").tolist() == [2, 0, 3]  # a/1 kept its slot; a/2's file changed
    assert second.done("train").tolist() == [False, True, False]
    split = open_cache(tmp_path / "c").load_split("train")
    assert split.video_ids == ["a/1"] and np.array_equal(split.features[0].numpy(), feats[0])
    assert open_cache(tmp_path / "c").fingerprint == {**FP, "manifest": "m2", "videos": 3}
    assert open_cache(tmp_path / "c").summary()["store"] == {"videos": 2, "not_in_this_manifest": 1}
    back = _growing(tmp_path, [("a/1", "10:1"), ("a/2", "20:1")])  # the first manifest again
    assert back.done("train").all() and back.slots("train").tolist() == [0, 1]
    assert len(list((tmp_path / "c" / "selections").glob("*/zarr.json"))) == 2
    # A video with nothing to extract has no slot and keeps its reason.
    layout = SplitLayout(["a/1", "a/9"], [0, 0], ["a"], views=2, files=["10:1", None], reasons={"a/9": "missing: x"})
    writer = CacheWriter.create(tmp_path / "c", FP, {"train": layout}, frames=8, patches=16, dim=4)
    assert writer.slots("train").tolist() == [0, -1] and writer.failures("train") == [("a/9", "missing: x")]


def test_a_test_video_stores_one_view_and_a_training_one_all(tmp_path):
    """The store holds V views a video; a val/test video gets view 0 only, and becomes pending for a
    training split that needs all V."""
    writer = CacheWriter.create(tmp_path / "c", FP, _layouts(), frames=8, patches=16, dim=4)
    writer.write("test", 0, np.ones((1, 8, 16, 4)))
    assert writer.views_done(writer.slots("test")).tolist() == [1, 0]
    moved = {"train": SplitLayout(["c/1"], [0], ["c"], views=2)}
    writer = CacheWriter.create(tmp_path / "c", {**FP, "manifest": "moved"}, moved, frames=8, patches=16, dim=4)
    assert writer.slots("train").tolist() == [3] and writer.pending("train").tolist() == [0]
    with pytest.raises(ValueError, match="wants 3 views, the cache holds 2"):
        CacheWriter.create(
            tmp_path / "c", FP, {"train": SplitLayout(["x"], [0], ["x"], 3)}, frames=8, patches=16, dim=4
        )


def test_a_dataset_folder_opens_its_one_cache_and_lists_several(tmp_path):
    folder = tmp_path / "mysports"
    write_random_cache(folder / "aaa", splits={"test": (2, 2, 1)}, dim=4)
    assert open_cache(folder).path == folder / "aaa"
    write_random_cache(folder / "bbb", splits={"test": (2, 3, 1)}, dim=4, seed=1)
    with pytest.raises(
        CacheError, match=r"mysports: holds 2 caches, pass one of them \(newest first\): .*bbb .*6 videos"
    ):
        open_cache(folder)
    (folder / "old").mkdir()
    (folder / "old" / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"schema": 1}})
    )
    with pytest.raises(
        CacheError, match="old: a cache of schema 1, keyed by its manifest.*run the same `strm extract` again"
    ):
        open_cache(folder / "old")
    result = CliRunner().invoke(app, ["info", str(folder)])
    assert (
        result.exit_code == 1
        and "holds 3 caches" in result.output
        and "schema 1, keyed by its manifest: extract again" in result.output
    )


def test_info_reads_a_support_index(tmp_path):
    """`strm info` on a saved support index: its actions and clips, the checkpoint and recipe it belongs to;
    a damaged one is one line naming the file."""
    from pipeline.evaluation.unknown import Calibration
    from pipeline.features.recipe import FeatureRecipe
    from pipeline.predict.support import SupportSet

    recipe = FeatureRecipe("tiny", "conv3", "random:0:ab", 40, 32, True, None, None, 8, 4, 1, 0, "v1", "fp32")
    calibration = Calibration(2.5, [1.0, 1.0], [0.5, 0.5], None, None, {})
    support = SupportSet(
        ["wave", "jump"],
        torch.tensor([0, 0, 1]),
        torch.zeros(3, 8),
        [("a.mp4", "wave"), ("b.mp4", "wave"), ("c.mp4", "jump")],
        [("d.mp4", "unreadable: moov atom not found")],
        calibration,
        "c" * 64,
        recipe,
        "random:0:ab",
    )
    path = support.save(tmp_path / "support.safetensors")
    result = CliRunner().invoke(app, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["kind"] == "support index" and summary["actions"] == {"wave": 2, "jump": 1}
    assert summary["temperature"] == 2.5 and summary["recipe"]["backbone"] == "tiny"
    assert summary["failed"] == ["d.mp4: unreadable: moov atom not found"] and summary["tensors"]["embedding"] == [3, 8]
    result = CliRunner().invoke(app, ["info", str(path)])
    assert "actions:" in result.output and "  wave: 2" in result.output
    (tmp_path / "bad.safetensors").write_bytes(b"nothing")
    result = CliRunner().invoke(app, ["info", str(tmp_path / "bad.safetensors")])
    assert result.exit_code == 1 and "bad.safetensors: not a support index" in result.output
