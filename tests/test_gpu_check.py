"""`make gpu-check` at --size tiny on the CPU: every step runs (or says why it cannot), and the JSON says so."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed: `pytest` alone lacks it
from benchmarks.gpu_check import STEPS, main  # noqa: E402


def test_every_step_runs_on_cpu_at_tiny_sizes(tmp_path):
    out = tmp_path / "gpu_check.json"
    code = main(["--device", "cpu", "--size", "tiny", "--out", str(out)])
    record = json.loads(out.read_text())
    failed = {name: record[name]["error"] for name in STEPS if record[name]["error"]}
    assert code == 0 and not failed, failed
    assert {"device", "torch", "cuda", "commit"} <= set(record) and record["size"] == "tiny"
    for name in STEPS:
        step = record[name]
        assert step["ok"] != bool(step["skipped"]), (name, step)  # ok, or skipped with a reason
        assert step["seconds"] >= 0
        for figure, value in step["figures"].items():
            assert isinstance(value["value"], float) and math.isfinite(value["value"]), (name, figure)
    for name in ("train_heads", "evaluate", "ddp"):  # they need no video library: they run on any CPU
        assert record[name]["ok"], record[name]
    if all(importlib.util.find_spec(m) for m in ("av", "torchcodec")):  # installed here: no step may skip
        for name in ("decode", "extract", "finetune"):
            assert record[name]["ok"], record[name]
    assert record["train_heads"]["figures"]["ram_tasks_per_s"]["value"] > 0
    assert any(note.startswith("training split: ram") for note in record["train_heads"]["notes"])
    assert record["ddp"]["figures"]["train_heads_step_difference"]["value"] <= 1e-4


def test_unknown_steps_and_devices_are_refused(tmp_path, capsys):
    assert main(["--only", "decodee", "--out", str(tmp_path / "x.json")]) == 2
    assert "unknown step 'decodee'" in capsys.readouterr().err
    assert main(["--device", "tpu", "--out", str(tmp_path / "x.json")]) == 2
    assert not Path(tmp_path / "x.json").exists()


def test_a_step_that_hangs_is_ended_and_recorded(tmp_path):
    """Each step runs in a process of its own: one past --step-timeout is killed, recorded as failed, and
    the run goes on to the next step."""
    out = tmp_path / "gpu_check.json"
    code = main(
        ["--device", "cpu", "--size", "tiny", "--only", "evaluate,ddp", "--step-timeout", "0.5", "--out", str(out)]
    )
    record = json.loads(out.read_text())
    assert code == 1
    for name in ("evaluate", "ddp"):
        assert not record[name]["ok"] and "timed out after 0.5 s" in record[name]["error"], record[name]
