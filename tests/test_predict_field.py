"""`strm predict` as a person first meets it (issue 24): short clips, the README's Python example as a plain
script, one path, variable frame rates, segments in the table and CSV, figures that a second run keeps,
the support's own accuracy, bad support folders and indexes, and NaN weights."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_predict import _clip, _support, world  # noqa: F401 - world is the module's fixture
from typer.testing import CliRunner
from vfr_video import VFR_TIMES, write_vfr_video

from pipeline.data.synth import write_mp4
from pipeline.predict import FewShotRecognizer, HeldOut, PredictError, merge_segments, unused_path
from stages.app import app

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(*args: str | Path) -> object:
    return CliRunner().invoke(app, ["predict", *map(str, args), "--device", "cpu", "--workers", "0"])


def test_clips_of_7_frames_and_of_1_frame_are_classified_with_a_note(world, tmp_path):  # noqa: F811
    root, _, heads = world
    support = tmp_path / "support"
    for c in (4, 5):
        for i in range(3):
            (support / f"c{c}").mkdir(parents=True, exist_ok=True)
            write_mp4(_clip(c, i, 7), support / f"c{c}" / f"v{i}.mp4")  # every support clip has 7 frames
    write_mp4(_clip(4, 8, 7), tmp_path / "seven.mp4")
    write_mp4(_clip(5, 8, 9)[:1], tmp_path / "one.mp4")
    out = tmp_path / "out.json"
    result = _cli(
        "--checkpoint", heads, "--support", support, tmp_path / "seven.mp4", tmp_path / "one.mp4", "--json", out
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert len(report["support"]["used"]) == 6 and {r["frames"] for r in report["support"]["repeated"]} == {7}
    assert any("6 support clip(s) have fewer than 8 frames" in n for n in report["notes"])
    seven, one = report["queries"]
    assert seven["status"] == one["status"] == "ok"
    assert "7 frames" in seven["note"] and "0, 0, 1, 2, 3, 4, 5, 6" in seven["note"]
    assert "1 frame," in one["note"] and "0, 0, 0, 0, 0, 0, 0, 0" in one["note"]


def _readme_example(index: Path, clips: Path, heads: Path, support: Path) -> str:
    """The README's "The same in Python" block, on tiny data, WITHOUT its `if __name__` guard."""
    text = (REPO / "README.md").read_text()
    block = text.split("The same in Python:", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    lines = block.strip("\n").splitlines()
    guard = next((k for k, line in enumerate(lines) if line.startswith("if __name__")), None)
    if guard is not None:  # the guard's body, dedented, in its place
        lines = lines[:guard] + textwrap.dedent("\n".join(lines[guard + 1 :])).splitlines()
    code = "\n".join(lines)
    for old, new in (
        ("runs/hmdb-strm/best.pt", heads),
        ("my_actions.safetensors", index),
        ("my_actions/", support),
        ("new_clips/", clips),
    ):
        assert old in code, old
        code = code.replace(old, str(new))
    return code


def test_the_readme_example_runs_as_a_plain_script_without_the_guard(world, tmp_path):  # noqa: F811
    """Decoding workers (forkserver/spawn) would re-import a script without the guard and run it again in each;
    the API starts them without it, so the example works as a plain script, in seconds."""
    root, _, heads = world
    support = _support(root, tmp_path / "support", {"c4": [0, 1], "c5": [0, 1]})
    clips = tmp_path / "new_clips"
    clips.mkdir()
    for c in (4, 5):
        os.symlink(root / "videos" / "test" / f"c{c}" / "v3.mp4", clips / f"c{c}.mp4")
    script = tmp_path / "example.py"
    script.write_text(_readme_example(tmp_path / "index.safetensors", clips, heads, support))
    assert "__main__" not in script.read_text()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", "import pipeline.predict.recognizer"], env=env, check=True, timeout=120)
    importing = time.monotonic() - start  # what a loaded machine adds before any of the example runs
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    took = time.monotonic() - start
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.match(r"c[45] 0\.\d+ support leave-one-out accuracy", done.stdout), done.stdout
    assert (tmp_path / "index.safetensors").exists()
    assert took - importing < 30, (took, importing)  # seconds: the guard-less failure took minutes


def test_one_path_is_one_query_and_a_stride_past_the_window_is_refused(world, tmp_path):  # noqa: F811
    root, _, heads = world
    recognizer = FewShotRecognizer.from_checkpoint(heads, device="cpu", workers=0)
    recognizer.add_support(_support(root, tmp_path / "support", {"c4": [0, 1], "c5": [0, 1]}))
    query = root / "videos" / "test" / "c5" / "v4.mp4"
    for one in (str(query), query):
        (record,) = recognizer.predict(one)
        assert record["path"] == str(query) and record["status"] == "ok"
    with pytest.raises(PredictError, match="--stride 2 s is longer than --window 1 s"):
        recognizer.predict(query, window=1.0, stride=2.0)


def test_windows_of_a_variable_frame_rate_recording_follow_its_timestamps(world, tmp_path):  # noqa: F811
    """10 fps for 3 s, then 30 fps: windows of 1 s are 0-1, 1-2, 2-3 s of 10 frames, then 3-4, 4-5, 5-6 s of
    30 (the average rate, 20 fps, would cut 1.5-2.5 s as "1-2 s")."""
    root, _, heads = world
    recognizer = FewShotRecognizer.from_checkpoint(heads, device="cpu", workers=1)
    recognizer.add_support(_support(root, tmp_path / "support", {"c4": [0, 1], "c5": [0, 1]}))
    path = write_vfr_video(tmp_path / "phone.mp4", VFR_TIMES, size=(48, 40))
    (record,) = recognizer.predict(path, window=1.0)
    assert [(w["start"], round(w["end"], 2)) for w in record["windows"]] == [(k, k + 1) for k in range(6)]
    assert [w["frames"] for w in record["windows"]] == [10, 10, 10, 30, 30, 30]
    assert record["segments"][0]["start"] == 0 and round(record["segments"][-1]["end"], 2) == 6


def test_what_a_person_reads_segments_names_figures_accuracy_and_exit_code(world, tmp_path):  # noqa: F811
    root, _, heads = world
    support = _support(root, tmp_path / "support", {"c4": [0, 1, 2], "c6": [0, 1, 2]})
    recording = tmp_path / "recording.mp4"
    write_mp4(np.concatenate([_clip(4, 7, 36), _clip(6, 7, 36)]), recording, fps=12)  # 3 s of c4, 3 s of c6
    for folder in ("a_folder_with_a_long_name_for_the_terminal", "another_folder_with_a_long_name_too"):
        (tmp_path / "clips" / folder).mkdir(parents=True)
        os.symlink(root / "videos" / "test" / "c4" / "v4.mp4", tmp_path / "clips" / folder / "same_name.mp4")
    args = ["--checkpoint", heads, "--support", support, recording, tmp_path / "clips", "--figures", tmp_path / "fig"]
    first = _cli(
        *args, "--window", "1", "--stride", "0.5", "--csv", tmp_path / "out.csv", "--json", tmp_path / "o.json"
    )
    assert first.exit_code == 0, first.output
    text = re.sub(r"\s+", " ", first.output)
    assert "support leave-one-out accuracy: " in text and "chance 50%)" in text
    column = "".join(line.split("│")[1].strip() for line in first.output.splitlines() if line.startswith("│"))
    for folder in ("a_folder_with_a_long_name_for_the_terminal", "another_folder_with_a_long_name_too"):
        assert f"clips/{folder}/same_name.mp4" in column, first.output  # folded in a narrow terminal, never cut
    report = json.loads((tmp_path / "o.json").read_text())
    segments = report["queries"][0]["segments"]
    assert segments and all(f"recording.mp4 {s['start']:.1f}-{s['end']:.1f} s" in first.output for s in segments)
    table = pd.read_csv(tmp_path / "out.csv")
    rows = table[(table["path"] == str(recording)) & (table["kind"] == "segment")]
    assert rows[["start", "end", "prediction"]].values.tolist() == [
        [s["start"], s["end"], s["prediction"]] for s in segments
    ]
    again = _cli(*args, "--window", "1", "--stride", "0.5")
    assert again.exit_code == 0, again.output
    figures = sorted(p.name for p in (tmp_path / "fig").iterdir() if p.name.startswith("recording"))
    assert figures == ["recording_timeline-2.png", "recording_timeline.png"]  # the second run's beside the first's
    failed = _cli("--checkpoint", heads, "--support", support, tmp_path / "missing.mp4")
    assert failed.exit_code == 1 and "nothing could be labelled: all 1 queries failed" in failed.output


def test_near_chance_is_said():
    assert not HeldOut(25, 24, 5).near_chance() and HeldOut(25, 24, 5).accuracy == 0.96
    assert HeldOut(25, 7, 5).near_chance()  # 28% against 20%
    assert HeldOut(283, 99, 5).near_chance()  # 35% of the real clips: better than chance, still near it
    assert HeldOut(10, 7, 2).near_chance() and not HeldOut(40, 36, 2).near_chance()  # 70% of 10 is luck at 2-way
    assert "WARNING near chance" in HeldOut(25, 7, 5).sentence()
    assert "none" in HeldOut(0, 0, 5).sentence()


def test_hidden_and_tool_folders_are_ignored_and_named(world, tmp_path):  # noqa: F811
    root, _, heads = world
    support = _support(root, tmp_path / "support", {"c4": [0, 1], "c5": [0, 1]})
    for junk in ("__MACOSX/c4", ".hidden", "c4/.ipynb_checkpoints"):
        (support / junk).mkdir(parents=True)
        os.symlink(root / "videos" / "test" / "c6" / "v0.mp4", support / junk / "v9.mp4")
    (support / "c5" / "._v0.mp4").write_bytes(b"\x00\x05\x16\x07 resource fork")
    queries = tmp_path / "queries"
    (queries / "__MACOSX").mkdir(parents=True)
    (queries / "__MACOSX" / "._q.mp4").write_bytes(b"\x00")
    os.symlink(root / "videos" / "test" / "c5" / "v4.mp4", queries / "q.mp4")
    result = _cli("--checkpoint", heads, "--support", support, queries, "--json", tmp_path / "o.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "o.json").read_text())
    assert report["actions"] == ["c4", "c5"] and len(report["support"]["used"]) == 4
    ignored = {str(Path(p).relative_to(tmp_path)) for p in report["support"]["ignored"] + report["ignored"]}
    assert ignored == {
        "support/.hidden",
        "support/__MACOSX",
        "support/c4/.ipynb_checkpoints",
        "support/c5/._v0.mp4",
        "queries/__MACOSX",
    }
    assert "ignored (hidden or tool folder): " in result.output and [q["path"] for q in report["queries"]] == [
        str(queries / "q.mp4")
    ]


def _rewrite(index: Path, out: Path, meta_change=None, tensor_change=None) -> Path:
    with safe_open(str(index), framework="pt") as f:
        meta = json.loads(f.metadata()["strm"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta_change:
        meta_change(meta)
    if tensor_change:
        tensor_change(tensors)
    save_file(tensors, str(out), metadata={"strm": json.dumps(meta)})
    return out


def test_a_bad_index_field_is_one_line_naming_the_file_and_the_field(world, tmp_path):  # noqa: F811
    root, _, heads = world
    maker = FewShotRecognizer.from_checkpoint(heads, device="cpu", workers=0)
    maker.add_support(_support(root, tmp_path / "support", {"c4": [0, 1], "c5": [0, 1], "c6": [0, 1]}))
    index = maker.save_support(tmp_path / "good.safetensors")
    query = root / "videos" / "test" / "c5" / "v4.mp4"

    def labels_out_of_range(t):
        t["labels"] = torch.tensor([0, 0, 1, 1, 2, 7])

    def nan_embedding(t):
        key = next(k for k in t if k.startswith("embedding.trm_k"))
        t[key] = torch.full_like(t[key], float("nan"))

    cases = {
        "extra: unknown field": lambda m: m.update(extra=1),
        "actions: missing": lambda m: m.pop("actions"),
        "calibration.temperature: -1, expected a number > 0": lambda m: m["calibration"].update(temperature=-1),
        "calibration.bogus: unknown field": lambda m: m["calibration"].update(bogus=[1]),
        "recipe.backbone: missing": lambda m: m["recipe"].pop("backbone"),
        "used: action(s) 'nope' not in actions": lambda m: m["used"][0].__setitem__(1, "nope"),
        "calibration.logit_std: 2 values, expected 3": lambda m: m["calibration"].update(logit_std=[1.0, 1.0]),
    }
    for k, (field, change) in enumerate(cases.items()):
        bad = _rewrite(index, tmp_path / f"bad{k}.safetensors", meta_change=change)
        result = _cli("--checkpoint", heads, "--support", bad, query)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        (line,) = result.output.strip().splitlines()
        assert line.startswith(f"error: {bad}: bad support index") and field in line, line
    for field, change in (
        ("tensor labels: value 7 out of range 0..2", labels_out_of_range),
        ("holds NaN or inf", nan_embedding),
    ):
        bad = _rewrite(index, tmp_path / "bad_tensor.safetensors", tensor_change=change)
        with pytest.raises(PredictError, match=re.escape(field)):
            FewShotRecognizer.from_checkpoint(heads, device="cpu", workers=0).add_support(bad)


def test_nan_weights_are_refused_naming_the_checkpoint(world, tmp_path):  # noqa: F811
    root, _, heads = world
    support = _support(root, tmp_path / "support", {"c4": [0, 1], "c5": [0, 1]})
    recognizer = FewShotRecognizer.from_checkpoint(heads, device="cpu", workers=0)
    index = recognizer.add_support(support)
    with torch.no_grad():
        next(recognizer.model.parameters()).fill_(float("nan"))
    with pytest.raises(PredictError, match="non-finite logits .*checkpoint's weights hold NaN or inf"):
        recognizer.predict(root / "videos" / "test" / "c5" / "v4.mp4")
    with pytest.raises(PredictError, match="checkpoint's weights hold NaN or inf"):
        recognizer.add_support(support)
    assert index.held_out is not None and index.held_out.held_out == 4


def test_short_flickers_join_a_neighbour_and_names_stay_free(tmp_path):
    def w(t, label, p):
        other = "b" if label == "a" else "a"
        return {
            "start": t,
            "end": t + 2,
            "prediction": label,
            "probability": p,
            "probabilities": {label: p, other: 1 - p},
        }

    labels = "aaaabaaaabbbbbb"
    windows = [w(0.5 * k, x, 0.8) for k, x in enumerate(labels)]
    raw = merge_segments(windows)
    assert [s["prediction"] for s in raw] == ["a", "b", "a", "b"] and raw[1]["end"] - raw[1]["start"] == 0.5
    smooth = merge_segments(windows, min_length=1.5)
    assert [(s["prediction"], s["start"], s["end"]) for s in smooth] == [("a", 0, 5.25), ("b", 5.25, 9.0)]
    assert smooth[0]["windows"] == 9 and smooth[0]["probability"] == pytest.approx((8 * 0.8 + 0.2) / 9)
    assert unused_path(tmp_path, "x", ".png").name == "x.png" and unused_path(tmp_path, "x", ".png").name == "x-2.png"


def test_a_flat_support_folder_is_told_the_expected_layout(tmp_path):
    from pipeline.predict.clips import support_folder

    for name in ("a.mp4", "b.mp4"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(PredictError) as err:
        support_folder(tmp_path)
    assert str(err.value) == (
        f"{tmp_path}: 2 video file(s) directly in it and 0 action folder(s); a support set is "
        "SUPPORT/<action>/<clip>, one folder per action, at least 2 actions"
    )
