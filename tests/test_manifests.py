"""Manifests: datasets resolved on disk, the pre-flight check in workers, the counts and the `strm manifest` stage."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner
from video_factory import write_test_video

from pipeline.data.checks import TaskSize, folder_warnings, split_warnings
from pipeline.data.manifests import (
    COLUMNS,
    ManifestError,
    bad_kinds,
    bad_videos,
    build_manifest,
    counts_key,
    dataset_name,
    read_class_splits,
    read_manifest,
    read_split_lists,
    resolve_manifest,
    split_counts,
    validate_manifest,
    write_manifest,
)
from pipeline.data.protocol import DATA_MANIFESTS, DATASETS, OFFICIAL_COUNTS

SHARED_SPLITS = Path(__file__).resolve().parents[2] / "shared" / "splits"
needs_shared_splits = pytest.mark.skipif(not SHARED_SPLITS.is_dir(), reason="the official split lists are not here")


@pytest.fixture(scope="module")
def hmdb_tree(tmp_path_factory) -> Path:
    """A few HMDB51 classes (train: brush_hair, val: cartwheel, test: fencing) with good and bad files."""
    root = tmp_path_factory.mktemp("hmdb51")
    write_test_video(root / "brush_hair" / "ok one.avi", 20, codec="mpeg4")
    write_test_video(root / "brush_hair" / "short.mp4", 5)
    write_test_video(root / "cartwheel" / "c.mp4", 30)
    (root / "fencing").mkdir()
    (root / "fencing" / "bad.avi").write_text("not a video\n" * 40)
    (root / "fencing" / "zero.mp4").write_bytes(b"")
    whole = write_test_video(root / "whole.mp4", 40).read_bytes()  # a stray file outside any class folder
    (root / "fencing" / "cut.mp4").write_bytes(whole[: len(whole) // 2])  # index at the end, cut off
    (root / "fencing" / "notes.txt").write_text("not listed: not a video suffix")
    return root


@pytest.fixture(scope="module")
def checked(hmdb_tree):
    """The tree's manifest plus one row whose file vanished, validated once in 2 workers."""
    built = build_manifest("hmdb51", hmdb_tree)
    gone = pd.DataFrame(
        [
            {
                "video_id": "cartwheel/gone",
                "class": "cartwheel",
                "split": "val",
                "path": str(hmdb_tree / "cartwheel" / "gone.mp4"),
                "n_frames": -1,
                "status": "ok",
            }
        ]
    )
    table = pd.concat([built, gone], ignore_index=True)
    ticks: list[int] = []
    return built, validate_manifest(table, workers=2, progress=ticks.append), ticks


def by_id(table: pd.DataFrame) -> dict[str, dict]:
    return table.set_index("video_id").to_dict("index")


def test_class_level_split_lists_every_video_of_a_class(hmdb_tree, checked):
    built, _, _ = checked
    assert list(built.columns) == list(COLUMNS)
    rows = by_id(built)
    found = {k: v for k, v in rows.items() if not k.endswith("/*")}
    assert set(found) == {
        "brush_hair/ok one",
        "brush_hair/short",
        "cartwheel/c",
        "fencing/bad",
        "fencing/zero",
        "fencing/cut",
    }
    assert {v["split"] for k, v in found.items() if k.startswith("brush_hair")} == {"train"}
    assert rows["cartwheel/c"]["split"] == "val" and rows["fencing/cut"]["split"] == "test"
    assert rows["brush_hair/ok one"]["path"] == str(hmdb_tree / "brush_hair" / "ok one.avi")
    assert all(v["n_frames"] == -1 for v in rows.values())  # not validated yet
    # the 48 classes without a folder are reported, one row each
    placeholders = [k for k in rows if k.endswith("/*")]
    assert len(placeholders) == 51 - 3
    assert all(rows[k]["status"].startswith("missing: no folder") for k in placeholders)


def test_validation_finds_counts_and_reasons(checked):
    _, table, ticks = checked
    rows = by_id(table)
    assert (rows["brush_hair/ok one"]["n_frames"], rows["brush_hair/ok one"]["status"]) == (20, "ok")
    assert (rows["cartwheel/c"]["n_frames"], rows["cartwheel/c"]["status"]) == (30, "ok")
    assert rows["brush_hair/short"]["status"] == "too short: 5 frames (< 8)"
    assert rows["brush_hair/short"]["n_frames"] == 5
    assert rows["fencing/zero"]["status"] == "empty: 0 bytes"
    assert rows["fencing/bad"]["status"].startswith("unreadable: cannot open")
    assert rows["fencing/cut"]["status"].startswith("unreadable: cannot open")
    assert rows["cartwheel/gone"]["status"] == "missing: no such file"
    assert sum(ticks) == len(table)
    kinds = bad_kinds(table)
    assert kinds == {"missing class": 48, "missing": 1, "too short": 1, "empty": 1, "unreadable": 2}
    assert set(bad_videos(table)["video_id"]) == set(table.loc[table["status"] != "ok", "video_id"])
    counts = split_counts(table, "hmdb51")
    assert counts["listed"].tolist() == [2, 2, 3]  # the missing classes' rows are no videos
    assert counts.loc["train", "ok"] == 1 and counts.loc["val", "ok"] == 1 and counts.loc["test", "ok"] == 0
    assert tuple(counts["official"]) == OFFICIAL_COUNTS["hmdb51"]


def write_lists(folder: Path, train: list[str], val: list[str], test: list[str], number: str = "03") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, lines in (("train", train), ("val", val), ("test", test)):
        (folder / f"{split}list{number}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_lists_resolve_class_folders_by_any_spelling_or_by_unique_name(tmp_path):
    videos = tmp_path / "videos"
    for rel in (
        "Air_Drumming/vid1.mp4",
        "anywhere/deep/vid3.webm",
        "x/vid4.mp4",
        "y/vid4.mp4",
        "blasting sand/vid5.avi",
    ):
        (videos / rel).parent.mkdir(parents=True, exist_ok=True)
        (videos / rel).write_bytes(b"\0")
    lists = write_lists(
        tmp_path / "lists",
        ["air drumming/vid1", "air drumming/vid2"],
        ["baking cookies/vid3"],
        ["blasting sand/vid4", "blasting sand/vid5"],
    )
    rows = by_id(build_manifest("kinetics100", videos, split_dir=lists))
    assert rows["air drumming/vid1"]["path"] == str(videos / "Air_Drumming" / "vid1.mp4")
    assert rows["air drumming/vid1"]["class"] == "air drumming"
    assert rows["baking cookies/vid3"]["path"] == str(videos / "anywhere" / "deep" / "vid3.webm")
    assert rows["blasting sand/vid5"]["split"] == "test" and rows["blasting sand/vid5"]["status"] == "ok"
    assert rows["air drumming/vid2"]["status"].startswith("missing: no video file vid2")
    assert rows["blasting sand/vid4"]["status"].startswith("missing: 2 files named vid4")


def test_ssv2_otam_and_cmn_formats(tmp_path):
    videos = tmp_path / "20bn-something-something-v2"
    videos.mkdir()
    for vid in ("78687", "42326", "195025", "51958"):
        (videos / f"{vid}.webm").write_bytes(b"\0")
    otam = build_manifest(
        "ssv2",
        videos,
        split_dir=write_lists(tmp_path / "otam", ["train8/78687"], ["val2/42326"], ["test18/195025"], "07"),
    )
    assert by_id(otam)["train8/78687"]["class"] == "train8"
    assert (otam["status"] == "ok").all()
    assert counts_key("ssv2", otam) == "ssv2_otam"
    cmn_class = "Putting something, something and something on the table"
    cmn = build_manifest(
        "ssv2",
        videos,
        split_dir=write_lists(tmp_path / "cmn", [f"{cmn_class}/51958"], ["val2/42326"], ["test18/195025"]),
    )
    assert by_id(cmn)[f"{cmn_class}/51958"]["class"] == cmn_class
    assert counts_key("ssv2", cmn) == "ssv2_cmn"
    assert tuple(split_counts(cmn, "ssv2")["official"]) == OFFICIAL_COUNTS["ssv2_cmn"]


@needs_shared_splits
@pytest.mark.parametrize(
    "folder,key",
    [
        ("hmdb_ARN", "hmdb51"),
        ("ucf_ARN", "ucf101"),
        ("kinetics_CMN", "kinetics100"),
        ("ssv2_OTAM", "ssv2_otam"),
        ("ssv2_CMN", "ssv2_cmn"),
    ],
)
def test_official_lists_give_the_official_counts(folder, key):
    entries = read_split_lists(SHARED_SPLITS / folder)
    counts = tuple(sum(1 for _, _, split in entries if split == s) for s in ("train", "val", "test"))
    assert counts == OFFICIAL_COUNTS[key]


@needs_shared_splits
@pytest.mark.parametrize("dataset,folder", [("hmdb51", "hmdb_ARN"), ("ucf101", "ucf_ARN")])
def test_bundled_class_splits_match_the_arn_lists(dataset, folder):
    bundled = read_class_splits(DATASETS[dataset].classes_csv)
    from_lists = {cls: split for _, cls, split in read_split_lists(SHARED_SPLITS / folder)}
    assert bundled == from_lists


def test_synthetic_and_folder_take_a_class_split_csv(tmp_path):
    synthetic = read_class_splits(DATA_MANIFESTS / "synthetic.csv")
    cls = sorted(synthetic)[0]
    (tmp_path / "synth" / cls).mkdir(parents=True)
    (tmp_path / "synth" / cls / "000.mp4").write_bytes(b"\0")
    rows = by_id(build_manifest("synthetic", tmp_path / "synth"))
    assert rows[f"{cls}/000"]["split"] == synthetic[cls]

    (tmp_path / "mine" / "waving").mkdir(parents=True)
    (tmp_path / "mine" / "waving" / "a.mov").write_bytes(b"\0")
    csv = tmp_path / "classes.csv"
    csv.write_text("class,split\nwaving,test\nclapping,train\n")
    rows = by_id(build_manifest("folder", tmp_path / "mine", classes_csv=csv))
    assert rows["waving/a"]["split"] == "test"
    assert rows["clapping/*"]["status"].startswith("missing: no folder clapping")


def test_definition_errors_name_the_problem(tmp_path):
    (tmp_path / "v").mkdir()
    cases = [
        (lambda: build_manifest("hmdb52", tmp_path / "v"), "unknown dataset"),
        (lambda: build_manifest("hmdb51", tmp_path / "nowhere"), "no such videos directory"),
        (lambda: build_manifest("kinetics100", tmp_path / "v"), "needs --split-dir"),
        (lambda: build_manifest("folder", tmp_path / "v"), "needs --classes"),
    ]
    bad_split = tmp_path / "bad_split.csv"
    bad_split.write_text("class,split\nwaving,validation\n")
    cases.append((lambda: build_manifest("folder", tmp_path / "v", classes_csv=bad_split), "unknown split"))
    bad_header = tmp_path / "bad_header.csv"
    bad_header.write_text("name,set\nwaving,val\n")
    cases.append((lambda: build_manifest("folder", tmp_path / "v", classes_csv=bad_header), "header"))
    no_slash = write_lists(tmp_path / "noslash", ["a/1"], ["just_an_id"], ["c/3"])
    cases.append((lambda: build_manifest("kinetics100", tmp_path / "v", split_dir=no_slash), "vallist03.txt:1"))
    two = write_lists(tmp_path / "two", ["a/1"], ["b/2"], ["c/3"])
    (two / "trainlist01.txt").write_text("a/1\n")
    cases.append((lambda: build_manifest("kinetics100", tmp_path / "v", split_dir=two), "expected one trainlist"))
    for call, words in cases:
        with pytest.raises(ManifestError, match=words):
            call()


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_write_read_round_trip(tmp_path, suffix):
    table = pd.DataFrame(
        {
            "video_id": ["007/1", "Putting something, something on it/2"],
            "class": ["007", "Putting something, something on it"],
            "split": ["train", "test"],
            "path": ["/v/007/1.mp4", ""],
            "n_frames": [41, -1],
            "status": ["ok", "missing: no video file 2.* under /v"],
        }
    )
    back = read_manifest(write_manifest(table, tmp_path / f"m{suffix}"))
    pd.testing.assert_frame_equal(back, table)
    with pytest.raises(ManifestError, match="not a manifest"):
        (tmp_path / "other.csv").write_text("a,b\n1,2\n")
        read_manifest(tmp_path / "other.csv")


def test_manifest_command_writes_manifest_report_and_counts(tmp_path, hmdb_tree):
    from stages.manifest import register

    app = typer.Typer()
    app.callback()(lambda: None)  # a group, as `strm` is
    register(app)
    classes = tmp_path / "classes.csv"
    classes.write_text("class,split\nbrush_hair,train\ncartwheel,val\nfencing,test\n")
    out = tmp_path / "out" / "mine.parquet"
    result = CliRunner().invoke(
        app,
        [
            "manifest",
            "folder",
            "--videos",
            str(hmdb_tree),
            "--classes",
            str(classes),
            "--out",
            str(out),
            "--workers",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    report = tmp_path / "out" / "mine.report.csv"
    assert "bad videos: 4 (" in result.output and str(report) in result.output
    table = read_manifest(out)
    assert len(table) == 6 and (table["status"] == "ok").sum() == 2
    assert set(pd.read_csv(report)["video_id"]) == {"brush_hair/short", "fencing/bad", "fencing/zero", "fencing/cut"}
    assert "train" in result.output and "listed" in result.output

    # --min-frames: the authors' rule (8) by default; lowered, one's own short clips are kept.
    lowered = tmp_path / "out" / "short.csv"
    args = ["manifest", "folder", "--videos", str(hmdb_tree), "--classes", str(classes), "--workers", "1"]
    result = CliRunner().invoke(app, [*args, "--out", str(lowered), "--min-frames", "5"])
    assert result.exit_code == 0, result.output
    rows = read_manifest(lowered).set_index("video_id")
    assert rows.loc["brush_hair/short", "status"] == "ok" and rows.loc["brush_hair/short", "n_frames"] == 5
    result = CliRunner().invoke(app, [*args, "--out", str(lowered), "--min-frames", "21"])
    rows = read_manifest(lowered).set_index("video_id")
    assert rows.loc["brush_hair/ok one", "status"] == "too short: 20 frames (< 21)"
    assert CliRunner().invoke(app, [*args, "--out", str(lowered), "--min-frames", "0"]).exit_code == 2

    result = CliRunner().invoke(app, ["manifest", "kinetics100", "--videos", str(hmdb_tree)])
    assert result.exit_code == 2 and "needs --split-dir" in result.output


def test_names_are_compared_in_nfc_so_a_macos_folder_is_found(tmp_path):
    """macOS writes folder and file names decomposed (NFD): 'Übung' on disk is U + combining diaeresis. The
    CSV's composed 'Übung' still finds it, and the video id is recorded composed."""
    nfd = unicodedata.normalize("NFD", "Übung")
    assert nfd != "Übung"
    (tmp_path / "v" / nfd).mkdir(parents=True)
    (tmp_path / "v" / nfd / unicodedata.normalize("NFD", "Sprünge 1.mp4")).write_bytes(b"\0")
    csv = tmp_path / "classes.csv"
    csv.write_text("class,split\nÜbung,train\n", encoding="utf-8")
    rows = by_id(build_manifest("folder", tmp_path / "v", classes_csv=csv))
    assert list(rows) == ["Übung/Sprünge 1"] and rows["Übung/Sprünge 1"]["status"] == "ok"
    assert folder_warnings(tmp_path / "v", csv) == []


def test_a_dataset_is_named_by_its_folder_or_name_and_found_by_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert dataset_name("folder", tmp_path / "My Sports (2024)") == "My_Sports_2024"
    assert dataset_name("folder", tmp_path / "x", "mysports") == "mysports"
    assert dataset_name("hmdb51", tmp_path / "anything") == "hmdb51"
    for kind, folder, name, words in (
        ("folder", "x", "hmdb51", "the built-in dataset's"),
        ("folder", "hmdb51", None, r"its folder's name\): pass --name"),
        ("folder", "x", "a/b", "letters, digits"),
        ("folder", "...", None, "pass --name"),
    ):
        with pytest.raises(ManifestError, match=words):
            dataset_name(kind, tmp_path / folder, name)
    with pytest.raises(ManifestError, match=r"no manifest for dataset 'mysports'.*--name mysports"):
        resolve_manifest("mysports")
    table = pd.DataFrame([dict.fromkeys(COLUMNS, "x") | {"n_frames": 9, "split": "train", "status": "ok"}])
    write_manifest(table, tmp_path / "data_manifests" / "local" / "mysports.csv")
    found, source = resolve_manifest("mysports")
    assert source == "data_manifests/local/mysports.csv" and len(found) == 1
    with pytest.raises(ManifestError, match=r"folder is a kind of dataset, not a name.*: mysports\)"):
        resolve_manifest("folder", tmp_path)


def test_splits_are_checked_for_videos_and_classes_big_enough_for_a_task():
    rows = [("train", f"c{c}", "ok") for c in range(5) for _ in range(9)]
    rows += [("train", "small", "ok")] * 3 + [("train", "small", "too short: 5 frames (< 8)")] * 6
    rows += [("val", "v0", "missing: no folder v0 with videos under /x")]
    rows += [("test", f"t{c}", "ok") for c in range(3) for _ in range(6)]
    table = pd.DataFrame(rows, columns=["split", "class", "status"])
    tasks = {"train": TaskSize(5, 5, 4), "val": TaskSize(5, 5, 1), "test": TaskSize(5, 5, 1)}
    warnings = split_warnings(table, tasks)
    assert len(warnings) == 3, warnings
    assert (
        warnings[0].startswith("split train: 1 of 6 classes have fewer than 9 usable videos")
        and "small: 3" in warnings[0]
    )
    assert warnings[1].startswith("split val: no usable videos (1 classes listed)") and "--val-every 0" in warnings[1]
    assert warnings[2].startswith("split test: 3 classes can enter a 5-way task")
    assert warnings[2].endswith("evaluate with a smaller --way")
    val = table.assign(split=table["split"].replace({"test": "val", "val": "test"}))
    assert split_warnings(val, tasks)[1].endswith("validate with a smaller --val-way (train-heads, finetune)")


def test_the_folder_route_warns_of_unlisted_folders_and_small_splits_and_names_the_dataset(tmp_path, monkeypatch):
    """`strm manifest folder` on a folder with friendly names: the name comes from the folder, the manifest
    goes to data_manifests/local/NAME.csv, 2 folders missing from the CSV and the empty val split are
    warnings with their count and fix; `strm extract NAME` then finds that manifest by itself."""
    from stages.app import app

    monkeypatch.chdir(tmp_path)
    videos = tmp_path / "my clips"
    for folder in ("waving", "jumping", "Übung", "spare", "extra one"):
        for i in range(2):
            write_test_video(videos / folder / f"clip {i}.mp4", 10)
    classes = tmp_path / "classes.csv"
    classes.write_text("class,split\nwaving,train\njumping,train\nÜbung,test\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["manifest", "folder", "--videos", str(videos), "--classes", str(classes)])
    assert result.exit_code == 0, result.output
    assert "warning: 2 class folders under" in result.output and "(extra one, spare)" in result.output
    assert "warning: split val: no usable videos (0 classes listed)" in result.output
    assert "dataset: my_clips (later stages take this name: strm extract my_clips)" in result.output
    assert read_manifest(tmp_path / "data_manifests" / "local" / "my_clips.csv")["status"].eq("ok").sum() == 6
    extract = ["extract", "my_clips", "--backbone", "tiny", "--views", "1", "--short-side", "40", "--crop", "32"]
    result = CliRunner().invoke(app, [*extract, "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "manifest: data_manifests/local/my_clips.csv (6 videos)" in result.output
    assert "this run: 6 videos extracted" in result.output and "cache/my_clips/" in result.output
    result = CliRunner().invoke(app, ["extract", "folder", "--backbone", "tiny"])
    assert result.exit_code == 1 and "folder is a kind of dataset, not a name" in result.output
